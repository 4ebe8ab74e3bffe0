"""The built-in tiny models: ``ephemera/tiny-llama``, a random Llama of a few hundred
KB, and its vision sibling ``ephemera/tiny-vl``, made on this machine, so a job can
serve a real model without reaching a hub.

The vision sibling is a random Idefics3 (SigLIP-style tower, pixel-shuffle connector,
Llama decoder) with its processor. Qwen2-VL was the first choice, but vLLM's CPU
build (0.32) cannot import it: ``vllm/model_executor/models/qwen2_vl.py`` imports
transformers' ``image_processing_qwen2_vl``, which needs torchvision ("No module named
'torchvision'"), and PyPI's torchvision 0.28.0 beside the CPU torch fails with
"operator torchvision::nms does not exist". The same holds for Qwen2.5-VL, Qwen3-VL,
LLaVA, Gemma 3, Pixtral/Mistral 3 and InternVL; Idefics3 imports and serves images.

The weights are random (the text it writes is noise) but the shapes are real: a
byte-level BPE tokenizer with a chat template and a 2-layer LlamaForCausalLM that
vLLM's CPU attention accepts (head_dim 64; 16 is refused). torch, transformers and
tokenizers live in the CPU environment only, so the generator runs as a script
under that environment's Python. The seed is fixed: the same files every time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from ephemera.builtins.cpu_env import ensure_cpu_env
from ephemera.errors import InfraError
from ephemera.spec.settings import get_settings

Progress = Callable[[str], None]

MARKER = ".ephemera-tiny-model.json"
SEED = 1234

# Runs under the CPU environment's Python: argv[1] = output dir, argv[2] = seed.
GENERATOR = r'''
import json
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out, seed = sys.argv[1], int(sys.argv[2])
torch.manual_seed(seed)

lines = [
    "The quick brown fox jumps over the lazy dog.",
    "ephemera runs GPU test jobs on throw-away machines and always tears them down.",
    "A tiny random model answers every request with noise, quickly.",
    "Hello! How are you today? I am fine, thank you.",
    "user assistant system: 0 1 2 3 4 5 6 7 8 9",
    "def add(a, b):\n    return a + b\n",
]
specials = ["<s>", "</s>", "<unk>", "<pad>"]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(lines * 4, trainer)

fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>", pad_token="<pad>")
fast.chat_template = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
fast.model_max_length = 512

config = LlamaConfig(
    vocab_size=len(fast),
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=512,
    bos_token_id=fast.bos_token_id,
    eos_token_id=fast.eos_token_id,
    pad_token_id=fast.pad_token_id,
    tie_word_embeddings=True,
)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.generation_config.pad_token_id = fast.pad_token_id
model.save_pretrained(out, safe_serialization=True)
fast.save_pretrained(out)
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()),
                  "vocab_size": len(fast)}))
'''


# Runs under the CPU environment's Python: argv[1] = output dir, argv[2] = seed.
VISION_GENERATOR = r"""
import json
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                          Idefics3ImageProcessorPil, Idefics3Processor, PreTrainedTokenizerFast)

out, seed = sys.argv[1], int(sys.argv[2])
torch.manual_seed(seed)
lines = ["The quick brown fox jumps over the lazy dog.", "Describe this image in one word.",
         "A red square on a white field.", "User Assistant: 0 1 2 3 4 5 6 7 8 9"]
grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
            "<image>", "<global-img>", *grid]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(lines * 4, trainer)
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                               eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
template = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}{% else %}:"
    "{% for part in message['content'] %}{% if part['type'] in ('image', 'image_url') %}<image>"
    "{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
fast.chat_template = template
fast.model_max_length = 1024
image_size, patch, scale = 56, 14, 2
config = Idefics3Config(
    text_config=dict(model_type="llama", vocab_size=len(fast), hidden_size=128,
                     intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                     tie_word_embeddings=True, bos_token_id=fast.bos_token_id,
                     eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id),
    vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, image_size=image_size, patch_size=patch),
    scale_factor=scale, pad_token_id=fast.pad_token_id,
    image_token_id=fast.convert_tokens_to_ids("<image>"), tie_word_embeddings=True)
model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                   max_image_size={"longest_edge": image_size})
processor = Idefics3Processor(image_processor=images, tokenizer=fast, chat_template=template,
                              image_seq_len=(image_size // patch) ** 2 // scale ** 2)
processor.save_pretrained(out)
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()),
                  "vocab_size": len(fast)}))
"""

RECIPES = {"tiny-llama": GENERATOR, "tiny-vl": VISION_GENERATOR}


def _quiet(_line: str) -> None:
    pass


def recipe_hash(name: str = "tiny-llama") -> str:
    return hashlib.sha256(f"{SEED}\0{RECIPES[name]}".encode()).hexdigest()[:16]


def default_dir(name: str = "tiny-llama") -> Path:
    return get_settings().cache_dir / "models" / name


def is_ready(out: Path, name: str = "tiny-llama") -> bool:
    try:
        data = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return data.get("hash") == recipe_hash(name) and (out / "config.json").exists()


def ensure_tiny_vl_model(progress: Progress | None = None, out: Path | None = None) -> Path:
    """The vision sibling (default CACHE_DIR/models/tiny-vl), made like the tiny model."""
    return ensure_tiny_model(progress, out=out, name="tiny-vl")


def ensure_tiny_model(progress: Progress | None = None, out: Path | None = None,
                      name: str = "tiny-llama") -> Path:
    """Write the tiny model ``name`` to ``out`` (default CACHE_DIR/models/NAME) unless
    it is already there from the same recipe; return the directory."""
    progress = progress or _quiet
    out = Path(out) if out is not None else default_dir(name)
    if is_ready(out, name):
        return out
    python = ensure_cpu_env(progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    progress(f"writing the tiny random model to {out}")
    # Write beside the target and move into place, so a half-written model is never
    # mistaken for a finished one.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staging = Path(tmp) / "model"
        script = Path(tmp) / "make_tiny_model.py"
        script.write_text(RECIPES[name])
        try:
            done = subprocess.run([str(python), str(script), str(staging), str(SEED)],
                                  capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise InfraError("writing the tiny model took more than 600s") from None
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-10:])
            raise InfraError(f"writing the tiny model failed (exit {done.returncode}): {tail}")
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}"
        (staging / MARKER).write_text(json.dumps({"hash": recipe_hash(name), "seed": SEED,
                                                  "summary": json.loads(summary)}))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    progress(f"tiny model ready at {out} ({size / 1024:.0f} KB)")
    return out
