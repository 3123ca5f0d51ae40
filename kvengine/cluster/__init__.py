"""Several engine replicas behind one endpoint: cache-aware routing (plain Python) and its Ray Serve face.

`prefix_tree` and `routing` are the routing core, with no Ray import: the Ray
request router (`ray_router`) and the trace simulation (`kvengine.sim.routing`)
both call them. `keys` turns a request body into a routing key. `replica`,
`ingress` and `launch` run kvengine engines as Ray Serve deployments; they
import Ray, which is the optional `cluster` extra.
"""
