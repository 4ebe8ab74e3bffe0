"""How long `plan` takes over a catalog of 10,000 offers (target: well under a second).

Builds a seeded random catalog from the built-in AWS types (prices, regions and spot
flags varied), writes it as CSV, and times: reading the CSV, planning a dense 8B model
(most offers fit) and a 72B model (most need tensor parallelism or are rejected).

    .venv/bin/python benchmarks/bench_plan.py [N]
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from ephemera.sizing.catalog import COLUMNS, builtin_aws_catalog, load_catalog
from ephemera.sizing.plan import job_shape, make_plan
from ephemera.spec.job import Job

ROOT = Path(__file__).resolve().parent.parent
LLAMA_8B = ROOT / "tests" / "data" / "reference-models" / "Llama-3.1-8B-Instruct"
QWEN25_72B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192,
              "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False,
              "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}
REGIONS = ["us-east-1", "us-east-2", "us-west-2", "eu-west-1", "eu-central-1", "ap-northeast-1"]


def make_catalog(path: Path, count: int) -> None:
    rng = random.Random(7)
    base = builtin_aws_catalog()
    with path.open("w") as fh:
        fh.write(",".join(COLUMNS) + ",spot\n")
        for i in range(count):
            o = base[i % len(base)]
            spot = rng.random() < 0.3
            price = o.price_per_hour * rng.uniform(0.8, 1.3) * (0.4 if spot else 1)
            fh.write(f"aws,{o.instance_type},{rng.choice(REGIONS)},{o.gpu},{o.gpu_count},"
                     f"{o.gpu_memory_gib},{o.vcpus},{o.memory_gib},{price:.4f},{str(spot).lower()}\n")


def job(model: str, **resources) -> Job:
    return Job.model_validate({"name": "bench", "image": "vllm/vllm-openai",
                               "suite": {"command": "true"}, "model": {"id": model},
                               "resources": {"spot": True, **resources}})


def timed(label: str, fn, repeat: int = 5):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    print(f"{label:<58} {best * 1000:8.1f} ms (best of {repeat})")
    return result


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "catalog.csv"
        make_catalog(csv_path, count)
        model_dir = Path(tmp) / "qwen72b"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(QWEN25_72B))
        offers = timed(f"read a {count}-offer CSV catalog", lambda: load_catalog(csv_path))
        for name, j in (("Llama-3.1-8B", job(str(LLAMA_8B))),
                        ("Qwen2.5-72B", job(str(model_dir))),
                        ("Llama-3.1-8B, $0.9/h cap, two regions",
                         job(str(LLAMA_8B), max_price_per_hour=0.9, regions=REGIONS[:2]))):
            plan = timed(f"plan {name} over {count} offers (config read included)",
                         lambda j=j: make_plan(j, offers))
            shape = job_shape(j)
            timed(f"plan {name} over {count} offers (shape reused)",
                  lambda j=j, shape=shape: make_plan(j, offers, shape=shape))
            print(f"  -> {plan.offer.instance_type} {plan.offer.region} TP={plan.tensor_parallel_size} "
                  f"${plan.offer.price_per_hour:.3f}/h; {len(plan.runners_up)} runners-up, "
                  f"{len(plan.rejected)} rejected")
        timed(f"whole `plan` path: read CSV + plan Llama-3.1-8B ({count} offers)",
              lambda: make_plan(job(str(LLAMA_8B)), load_catalog(csv_path)))


if __name__ == "__main__":
    main()
