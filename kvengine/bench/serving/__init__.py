"""`kvengine bench serve`: a closed-loop streaming load generator against an OpenAI-compatible server."""
