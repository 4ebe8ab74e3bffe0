"""Estimate the GPU memory vLLM needs for a model (weights, KV cache, activations)."""

from __future__ import annotations

import json

import click

PRECISIONS = ["fp32", "bf16", "fp16", "fp8", "int8", "int4"]


@click.command("estimate")
@click.argument("model")
@click.option("--precision", type=click.Choice(PRECISIONS), default="bf16", show_default=True,
              help="Weights precision (a quantization_config in the model's config wins).")
@click.option("--max-model-len", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True), default=0.9,
              show_default=True)
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=None,
              help="Default: vLLM's for the GPU size the model needs.")
@click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]),
              default="auto", show_default=True)
@click.option("--revision", default=None, help="Hugging Face revision.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def command(model: str, precision: str, max_model_len: int, tensor_parallel_size: int,
            gpu_memory_utilization: float, max_num_seqs: int | None, kv_cache_dtype: str,
            revision: str | None, as_json: bool) -> None:
    """Estimate the GPU memory vLLM needs for a model (weights, KV cache, activations).

    MODEL is a Hugging Face repo id, a local directory holding config.json, or a bare
    size such as 7B (then only the weights are known and the rest is a guess).
    """
    from ephemera.sizing.estimate import estimate
    from ephemera.sizing.modelconfig import load_model

    info = load_model(model, revision=revision)
    est = estimate(info, precision=precision, max_model_len=max_model_len,
                   tensor_parallel_size=tensor_parallel_size,
                   gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                   kv_cache_dtype=kv_cache_dtype)
    if as_json:
        click.echo(json.dumps(est.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{est.model} ({est.architecture}, {est.precision}, TP={est.tensor_parallel_size})",
                  show_header=True, title_justify="left")
    table.add_column("per GPU")
    table.add_column("GiB", justify="right")
    table.add_row("weights", f"{est.weights_gib_per_gpu:.2f}")
    table.add_row(f"KV cache, one {est.max_model_len}-token request",
                  f"{est.kv_cache_gib_per_request_per_gpu:.2f}")
    table.add_row(f"activation peak ({est.max_num_seqs} seqs)", f"{est.activation_gib_per_gpu:.2f}")
    table.add_row("non-torch overhead", f"{est.overhead_gib_per_gpu:.2f}")
    table.add_row("CUDA context (outside the budget)", f"{est.cuda_context_gib_per_gpu:.2f}")
    table.add_row(f"required GPU memory at utilization {est.gpu_memory_utilization:g}",
                  f"{est.required_gib_per_gpu:.2f}", style="bold")
    console = Console()
    console.print(table)
    console.print(f"parameters {est.parameters:,} (active {est.active_parameters:,}); "
                  f"weights {est.weights_gib:.2f} GiB in all; KV cache "
                  f"{est.kv_cache_bytes_per_token:,} bytes per token ({est.kv_cache_dtype}).",
                  highlight=False)
    for note in est.notes:
        console.print(f"note: {note}", highlight=False)
