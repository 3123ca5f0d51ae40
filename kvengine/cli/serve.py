"""`kvengine serve`: its parser and command, which run the OpenAI-compatible HTTP server.

The server itself lives in kvengine/server; this module only turns options into a
`ServerConfig`, cache and scheduler configs, and runs the server (`kvengine.server.serve`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from kvengine.cli.argtypes import positive_float, positive_int
from kvengine.cli.common import CONFIG_HELP, add_config_args, add_model_args, config_from_args
from kvengine.config import DEFAULT_MODEL, CacheConfig, SchedulerConfig, ServerConfig
from kvengine.errors import InvalidRequestError

_SERVE_HELP = """Serve MODEL (a bundled name, a local Hugging Face directory or a .gguf file;
or --model) at /v1/completions, /v1/chat/completions (streaming with "stream": true), /v1/models,
/tokenize, /detokenize, /version, /health and /metrics (Prometheus, no key needed). Extra body fields
"kv_press" and "kv_compression_ratio" compress a request's prompt with a registered press. With
--api-key, each key is a tenant of the prefix cache; --public-prefix TEXT (with --prefix-cache) lets
all tenants share the cached blocks of a common system prompt. --tiers host,disk,redis keeps cached
blocks below the pool. SIGTERM or Ctrl-C shuts down gracefully: new requests get 503 (and /ready
503), those in flight get --shutdown-grace-s to finish, then the rest end with an error (an error
event and [DONE] in a stream), and the tiers are flushed; a second signal stops at once. Clients
must send a request's headers within --header-timeout-s and its body within --body-timeout-s
(else 408)."""


# ServerConfig's per-request limits and timeouts, each an option: (argument type, help).
_LIMITS: dict[str, tuple[Callable[[str], float], str]] = {
    "max_prompt_tokens": (positive_int, "longest prompt accepted, in tokens"),
    "max_tokens_limit": (positive_int, "largest max_tokens a request may ask for"),
    "max_concurrent_requests": (positive_int, "requests in flight at once; more get 429"),
    "max_body_bytes": (positive_int, "largest request body; larger gets 413"),
    "max_stop_strings": (positive_int, "most stop strings a request may send; more get 400"),
    "max_stop_string_chars": (positive_int, "longest stop string, in characters; longer gets 400"),
    "shutdown_grace_s": (positive_float, "on SIGTERM or Ctrl-C, seconds for requests in flight to finish"),
    "header_timeout_s": (positive_float, "seconds a client has to send a request's headers; then 408"),
    "body_timeout_s": (positive_float, "seconds a client has to send a request's body; then 408"),
}


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """`serve`: the OpenAI-compatible HTTP server (kvengine/server)."""
    defaults = ServerConfig()
    sv = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API", description=_SERVE_HELP
    )
    sv.add_argument(
        "model_arg",
        nargs="?",
        metavar="MODEL",
        default=None,
        help=f"bundled model name, local HF directory or .gguf file (default: {DEFAULT_MODEL})",
    )
    add_model_args(sv)
    sv.set_defaults(model=None)  # so that `serve MODEL --model OTHER` can be refused
    sv.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the name clients call the model by (/v1/models, `model` fields; default: MODEL as given)",
    )
    sv.add_argument("--host", default=defaults.host, help=f"address to listen on (default: {defaults.host})")
    sv.add_argument("--port", type=int, default=defaults.port, help=f"port (default: {defaults.port})")
    sv.add_argument(
        "--api-key", action="append", default=[], help="accepted Bearer key (repeatable; none: no auth)"
    )
    sv.add_argument(
        "--public-prefix",
        action="append",
        default=[],
        metavar="TEXT",
        help="a system prompt (or prompt start) whose cached blocks all tenants share "
        "(repeatable; needs --prefix-cache)",
    )
    for name, (kind, text) in _LIMITS.items():
        default = getattr(defaults, name)
        shown = f"{default:g}" if isinstance(default, float) else default
        sv.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=default, help=f"{text} (default: {shown})"
        )
    add_config_args(sv, CacheConfig, CONFIG_HELP)
    add_config_args(sv, SchedulerConfig, CONFIG_HELP)


def model_of(args: argparse.Namespace) -> str:
    """The model `serve` was given, as MODEL or `--model`; InvalidRequestError if both, differing."""
    if args.model_arg is not None and args.model is not None and args.model_arg != args.model:
        raise InvalidRequestError(f"two models given: {args.model_arg!r} and --model {args.model!r}")
    return str(args.model_arg or args.model or DEFAULT_MODEL)


def cmd_serve(args: argparse.Namespace) -> None:
    """Load the model and serve it until interrupted."""
    import logging

    from kvengine.engine.async_engine import AsyncEngine
    from kvengine.engine.engine import Engine
    from kvengine.models import load
    from kvengine.server import create_app
    from kvengine.server.serve import make_server, startup_line

    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_keys=tuple(args.api_key),
        public_prefixes=tuple(args.public_prefix),
        **{name: getattr(args, name) for name in _LIMITS},
    )
    cache = config_from_args(CacheConfig, args)
    scheduler = config_from_args(SchedulerConfig, args)
    model = load(model_of(args), dtype=args.dtype, device=args.device, weights=args.weights)
    engine = Engine(model, cache, scheduler)
    app = create_app(AsyncEngine(engine), model, config, args.served_model_name)
    server = make_server(app, config)  # also sets up uvicorn's logging
    logging.getLogger("uvicorn.error").info(startup_line(engine, app.state.server.model_name))
    server.run()
