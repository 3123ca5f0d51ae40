"""One Ray instance, three systems in turn: 1 replica, 2 replicas round_robin, 2 replicas prefix."""
import subprocess, sys, time, json
from pathlib import Path
from ray import serve
from kvengine.cluster.launch import APP_NAME, ClusterConfig, _init_ray, build_app
from kvengine.cluster.replica import ReplicaSpec
from kvengine.config import CacheConfig, ServerConfig
import httpx

OUT = Path("/tmp/h18/bench_out"); OUT.mkdir(parents=True, exist_ok=True)
PORT = 18310
spec = ReplicaSpec(model="/tmp/h18/tiny", dtype="float32", served_model_name="tiny",
                   server=ServerConfig(api_keys=("sk-bench",)), cache=CacheConfig(prefix_cache=True))
t = time.time()
_init_ray(ClusterConfig(num_replicas=2, local_num_cpus=3), attempts=6)
serve.start(http_options={"host": "127.0.0.1", "port": PORT})
print("ray+serve up", round(time.time() - t), flush=True)
for n, router in [(1, "prefix"), (2, "round_robin"), (2, "prefix")]:
    tag = f"r{n}_{router}"
    t = time.time()
    cfg = ClusterConfig(num_replicas=n, router=router, port=PORT, num_cpus=1.0)
    serve.run(build_app(spec, cfg), name=APP_NAME, route_prefix="/")
    print(tag, "deployed", round(time.time() - t), flush=True)
    for wl in ("shared-prefix", "multi-turn"):
        cmd = [sys.executable, "-m", "kvengine.cli", "bench", "serve", "--url", f"http://127.0.0.1:{PORT}",
               "--api-key", "sk-bench", "--workload", wl, "--clients", "4", "--duration-s", "30",
               "--prompt-len-range", "8,16", "--max-tokens-range", "4,8", "--shared-prefix-len", "50",
               "--num-groups", "8", "--turns", "4", "--seed", "0", "--out", str(OUT / tag / wl)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(tag, wl, "rc", r.returncode, r.stderr[-300:], flush=True)
    print(tag, "metrics", httpx.get(f"http://127.0.0.1:{PORT}/metrics", timeout=30).text.count("\n"), flush=True)
    (OUT / f"{tag}_metrics.txt").write_text(httpx.get(f"http://127.0.0.1:{PORT}/metrics", timeout=30).text)
    serve.delete(APP_NAME)
serve.shutdown()
