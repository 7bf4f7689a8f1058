"""A kvdrive engine in its own process, for the remote tier's tests (test_remote_mooncake.py).

    python tests/prefix/remote_engine.py '{"chunk_tokens": 16, "host_bytes": 67108864, ...}'

SmolLM2 on the CPU, greedy. One prefix pool (a host arena, and a remote tier once told
where the store is) shared by an LLM per tenant, and a plain LLM for cold runs. Commands
come on stdin, one JSON object a line; each is answered on stdout, one JSON object a line:

  {"op": "connect", "master": ..., "metadata": ...}  open the pool on that store
  {"op": "gen", "ids": [...], "tenant": "a", "cold": false}  -> out, seconds, the load report
  {"op": "loop", "prompts": [[...], ...]}  one answer per prompt, then {"done": true}
  {"op": "names", "ids": [...], "tenant": ""}  the store's object names, [chunk][layer]
  {"op": "flush"}, {"op": "stats"}, {"op": "quit"}
"""

import dataclasses
import json
import sys
import time

from kvdrive import LLM, PrefixConfig, RemoteConfig, SamplingParams
from kvdrive.models.identity import weights_digest
from kvdrive.models.loader import load_model
from kvdrive.prefix import PrefixPool
from kvdrive.prefix.keys import chunk_keys


def main() -> None:
    opts = json.loads(sys.argv[1])
    loaded = load_model("smollm2", device="cpu", dtype="float32")
    digest = weights_digest(loaded.model)
    cold = LLM(loaded=loaded)
    params = SamplingParams(max_tokens=opts.get("max_tokens", 6), temperature=0, ignore_eos=True)
    pool, llms = None, {}

    def reply(**fields):
        print(json.dumps(fields), flush=True)

    def generate(ids, tenant, use_cold):
        llm = cold if use_cold else llms.setdefault(tenant, LLM(loaded=loaded, prefix_cache=pool, tenant=tenant))
        waited = pool.remote.stats().wait_s if pool is not None else 0.0
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params)[0].token_ids
        s = time.perf_counter() - t0
        if use_cold:
            return {"out": out, "s": s}
        return {
            "out": out,
            "s": s,
            "load": pool.last_load and dataclasses.asdict(pool.last_load),
            "remote_wait_s": pool.remote.stats().wait_s - waited,
        }

    reply(ready=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "connect":
            if pool is not None:
                pool.close()
            llms = {}
            remote = RemoteConfig(master=cmd["master"], metadata=cmd["metadata"], **opts.get("remote", {}))
            pool = PrefixPool(
                loaded.config,
                loaded.model.dtype,
                PrefixConfig(chunk_tokens=opts["chunk_tokens"], host_bytes=opts.get("host_bytes", 0), remote=remote),
                weights=digest,
            )
            reply(state=pool.remote.state)
        elif op == "gen":
            reply(**generate(cmd["ids"], cmd.get("tenant", ""), cmd.get("cold", False)))
        elif op == "loop":
            for i, ids in enumerate(cmd["prompts"]):
                reply(i=i, **generate(ids, cmd.get("tenant", ""), False))
            reply(done=True)
        elif op == "names":
            keys = chunk_keys(cmd["ids"], pool.namespace(cmd.get("tenant", "")))
            reply(names=[[pool.remote.name(k, layer) for layer in range(pool.num_layers)] for k in keys])
        elif op == "flush":
            reply(ok=pool.remote.flush(10))
        elif op == "stats":
            reply(**dataclasses.asdict(pool.stats()))
        elif op == "quit":
            t0 = time.perf_counter()
            if pool is not None:
                pool.close()
            reply(closed_s=time.perf_counter() - t0)
            break


if __name__ == "__main__":
    main()
