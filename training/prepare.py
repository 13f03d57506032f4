"""A YAML's data, prepared once and reused: tokenizer (trained where the YAML asks), tokenization, packing, cache.

`prepare_data(cfg)` computes the cache key, reuses a verified entry (a hit) or builds one (a miss), and logs
one line with the key and which it was. It runs in exactly one process per cache: `tune-launch prepare`, or
the rank that training/coordinate.py picks; every other rank only opens the result.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_launch.training import datacache as C
from tune_launch.training.schema import DataSource, TrainingConfig

log = logging.getLogger("tune_launch")
TOKENIZER_VERSION = 1
WORKER_TOKENIZER = "worker-tokenizer"  # a copy for data.num_proc workers, inside the build folder, never published


@dataclass(frozen=True)
class PreparedData:
    entry: Path
    key: str
    hit: bool
    task: str
    tokenizer_dir: Path | None  # the tokenizer trained for this data (tokenizer.train_vocab_size), in the cache
    info: dict[str, Any]
    seconds: float
    tokenizer: Any = field(default=None, compare=False, repr=False)  # loaded here already (this process only)

    def datasets(self):
        """(train, eval or None), memory-mapped."""
        if self.task == "sft":
            from tune_launch.training.prepare_sft import load_sft

            return load_sft(self.entry)
        from tune_launch.training.rowstore import StoredRows

        i = self.info
        splits = {name: StoredRows(self.entry, name, i["packing"], i["max_length"], i["dtype"], s["rows"])
                  for name, s in i["splits"].items() if s["rows"]}
        return splits.get("train"), splits.get("eval")  # no train split: data.streaming reads it on the fly

    def summary(self) -> str:
        """The lines `tune-launch prepare` prints."""
        i = self.info
        lines = [f"data {'cache hit' if self.hit else 'prepared'}: {self.entry}", f"  key {self.key}"]
        for name, s in sorted(i.get("splits", {}).items(), key=lambda kv: kv[0] != "train"):
            parts = [f"{s[k]:,} {k}" for k in ("documents", "tokens", "rows") if k in s]
            if i.get("packing") and "padding" in s:
                parts.append(f"{100 * s['padding']:.2f}% padding")
            lines.append(f"  {name}: " + ", ".join(parts))
        if i.get("streaming"):
            lines.append("  train: streamed while training (data.streaming), nothing to prepare")
        if not self.hit and i.get("tokens_per_second"):
            lines.append(f"  {i['tokenized']:,} tokens in {i['seconds']:.1f} s ({i['tokens_per_second']:,.0f} tokens/s)")
        if self.tokenizer_dir is not None:
            lines.append(f"  tokenizer: {self.tokenizer_dir}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- identities (what the key is made of)

def _sources(cfg: TrainingConfig) -> list[tuple[str, DataSource]]:
    return [("train", s) for s in cfg.data.train or []] + [("eval", s) for s in cfg.data.eval or []]


def source_identities(cfg: TrainingConfig, hubs: dict[int, Any]) -> dict[str, Any]:
    from tune_launch.training.sources import hub_identity, local_identity

    d = cfg.data
    if d.generate is not None:
        from tune_launch.training.synthetic import GENERATOR_VERSION

        return {"generate": d.generate.model_dump(), "generator": GENERATOR_VERSION}
    out: dict[str, list] = {"train": [], "eval": []}
    for split, s in _sources(cfg):
        spec = s.model_dump(exclude={"path", "name"})
        if s.path is not None:
            files = local_identity(s)
        elif id(s) in hubs:
            files = hub_identity(hubs[id(s)], s)
        else:  # streamed from the hub: nothing downloaded to fingerprint
            files = {"name": s.name, "subset": s.subset, "split": s.split, "streamed": True}
        out[split].append({"spec": spec, "data": files})
    return out


def _hub_sources_to_load(cfg: TrainingConfig) -> list[DataSource]:
    """Hub sources read through datasets' Arrow cache (a streamed training source is never downloaded whole)."""
    return [s for split, s in _sources(cfg) if s.path is None and not (cfg.data.streaming and split == "train")]


def tokenizer_fingerprint(tok) -> str:
    """What makes two tokenizers tokenize alike: vocabulary, merges, normalizer, special tokens (and, for chat
    data, the template)."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return C.digest({"class": type(tok).__name__, "body": C.digest(body), "len": len(tok),
                     "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id],
                     "chat_template": getattr(tok, "chat_template", None)})


def trained_tokenizer_key(cfg: TrainingConfig, sources: dict[str, Any]) -> str:
    import tokenizers

    t = cfg.tokenizer
    return C.digest({"v": TOKENIZER_VERSION, "tokenizers": tokenizers.__version__, "task": cfg.task,
                     "train": sources.get("train", sources), "vocab": t.train_vocab_size,
                     "sample_bytes": t.train_sample_bytes, "chat_template": t.chat_template})


def config_key(cfg: TrainingConfig, env: Mapping[str, str]) -> str | None:
    """A cheap stand-in for the key, from the YAML and file metadata only (no tokenizer loaded), or None when
    a hub source makes it unknowable offline. The preflight uses it to tell whether the data is prepared."""
    if any(s.path is None for _, s in _sources(cfg)):
        return None
    try:
        sources = source_identities(cfg, {})
    except Exception:  # noqa: BLE001 - a missing or unreadable file: the run itself names it
        return None
    tok = cfg.tokenizer.model_dump() if cfg.tokenizer is not None else None
    name = (cfg.tokenizer.name_or_path if cfg.tokenizer is not None else None) or cfg.model.name_or_path
    files = []
    if name and Path(name).is_dir():
        files = [C.file_identity(p) for p in sorted(Path(name).iterdir()) if p.is_file() and "token" in p.name]
    return C.digest({"v": C.PREP_VERSION, "task": cfg.task, "sources": sources, "tokenizer": tok, "name": name,
                     "files": files, "max_length": cfg.max_length, "packing": cfg.packing, "seed": cfg.seed,
                     "eval_fraction": cfg.data.eval_fraction, "completion_only_loss": cfg.completion_only_loss})


# --------------------------------------------------------------------------- the tokenizer

def _trained_tokenizer(cfg: TrainingConfig, root: Path, key: str, sample) -> Path:
    """The cache folder of the tokenizer trained for this data; trained (on a bounded sample) when missing."""
    folder = root / f"tokenizer-{key}"
    if C.verify(folder) is None:
        return folder
    if folder.exists():
        log.warning("tokenizer cache %s is damaged (%s): training it again", folder, C.verify(folder))
        C.discard(folder, "corrupt")
    from tune_launch.training.synthetic import train_tokenizer

    t = cfg.tokenizer
    t0 = time.perf_counter()
    texts = sample()
    tok = train_tokenizer(texts, t.train_vocab_size, t.chat_template)
    build = C.new_build_dir(root, f"tokenizer-{key}")
    tok.save_pretrained(str(build))
    C.publish(build, folder, key, {}, {"texts": len(texts), "characters": sum(map(len, texts)),
                                       "seconds": time.perf_counter() - t0})
    log.info("tokenizer trained on %d texts (%.1f MB, tokenizer.train_sample_bytes) in %.1f s: %s", len(texts),
             sum(map(len, texts)) / 1e6, time.perf_counter() - t0, folder)
    return folder


def _pretrain_sample(cfg: TrainingConfig, hubs: dict[int, Any]):
    def sample() -> list[str]:
        from tune_launch.training.sources import sample_texts

        budget = cfg.tokenizer.train_sample_bytes
        if cfg.data.generate is not None:
            from tune_launch.training import synthetic

            g = cfg.data.generate
            rows = synthetic.generate(g.kind, g.train_samples, g.eval_samples, g.seed)[0]
            from tune_launch.training.sources import prefix_texts
            from tune_launch.training.prepare_text import generated_batches

            return prefix_texts(generated_batches(rows, "generated")(), budget)
        train = cfg.data.train or []
        share = budget // len(train)
        return [t for s in train for t in (sample_texts(s, share, hubs.get(id(s))) if id(s) in hubs or s.path is not None
                                           else _streamed_prefix(s, share))]
    return sample


def _streamed_prefix(src: DataSource, budget: int) -> list[str]:
    """The start of a hub dataset that is streamed, not downloaded (tokenizer training for data.streaming)."""
    from datasets import load_dataset

    texts, used = [], 0
    for row in load_dataset(src.name, src.subset, split=src.split, streaming=True):
        texts.append(str(row[src.text_field]))
        used += len(texts[-1])
        if used >= budget:
            break
    return texts


# --------------------------------------------------------------------------- prepare

def prepare_data(cfg: TrainingConfig, env: Mapping[str, str] | None = None, sft_args=None,
                 bar: bool | None = None) -> PreparedData:
    """The cache entry for this YAML's data: reused when complete and intact, else built and published."""
    from tune_launch.training.prepare_progress import BusyProgress
    from tune_launch.training.sources import load_hub

    env = os.environ if env is None else env
    t0 = time.perf_counter()
    root = C.cache_root(cfg.data.cache_dir, env)
    with BusyProgress():  # a hub dataset's download reports nothing of its own
        hubs = {id(s): load_hub(s) for s in _hub_sources_to_load(cfg)}
    sources = source_identities(cfg, hubs)
    trained_key = trained_tokenizer_key(cfg, sources) if cfg.tokenizer and cfg.tokenizer.train_vocab_size else None
    tokenizer = None
    if trained_key is None:
        from tune_launch.training.model import load_tokenizer

        tokenizer = load_tokenizer(cfg)
    key = data_key(cfg, sources, {"trained": trained_key} if trained_key else tokenizer_fingerprint(tokenizer), sft_args)
    entry = root / f"{cfg.task}-{key}"
    tok_dir = root / f"tokenizer-{trained_key}" if trained_key else None
    problem = C.verify(entry) if entry.exists() else "absent"
    if problem is None and (tok_dir is None or C.verify(tok_dir) is None):
        done = PreparedData(entry, key, True, cfg.task, tok_dir, C.read_manifest(entry)["info"], time.perf_counter() - t0,
                            tokenizer)
        log.info("data cache hit: key %s, %s (verified in %.1f s)", key, entry, done.seconds)
    else:
        if problem not in (None, "absent"):
            log.warning("data cache %s is damaged (%s): rebuilding it, never training on it", entry, problem)
            C.discard(entry, "corrupt")
        log.info("data cache miss: key %s, preparing %s", key, entry)
        info, tok_dir = _build(cfg, root, key, entry, hubs, tokenizer, trained_key, sft_args, bar)
        done = PreparedData(entry, key, False, cfg.task, tok_dir, info, time.perf_counter() - t0, tokenizer)
        log.info("data prepared: key %s, %s (%.1f s)", key, entry, done.seconds)
    ck = config_key(cfg, env)
    if ck is not None:
        C.record_index(root, ck, entry)
    return done


def data_key(cfg: TrainingConfig, sources: dict[str, Any], tokenizer: Any, sft_args) -> str:
    """The entry's name: a hash of everything that changes the prepared rows (see the module docstring of
    training/datacache.py), and nothing else (not data.num_proc, cache_dir or prepare_timeout)."""
    parts: dict[str, Any] = {"v": C.PREP_VERSION, "task": cfg.task, "sources": sources, "tokenizer": tokenizer,
                             "max_length": cfg.max_length, "packing": cfg.packing, "seed": cfg.seed,
                             "eval_fraction": cfg.data.eval_fraction, "streaming": cfg.data.streaming}
    if cfg.task == "sft":
        import trl

        from tune_launch.training.prepare_sft import prep_settings

        parts.update(trl=trl.__version__, sft=prep_settings(_sft_args(cfg, sft_args)))
    return C.digest(parts)


def _sft_args(cfg: TrainingConfig, sft_args):
    if sft_args is not None:
        return sft_args
    from trl import SFTConfig

    from tune_launch.profiles import get_profile
    from tune_launch.training.distributed import RankInfo
    from tune_launch.training.settings import DeviceFacts, resolve_settings
    from tune_launch.training.trainer import arguments

    device = DeviceFacts.probe("cpu")  # what TRL's preparation depends on is the same on every device
    return SFTConfig(**arguments(cfg, RankInfo(), True, resolve_settings(cfg, device, get_profile("cpu")), device))


def _build(cfg, root, key, entry, hubs, tokenizer, trained_key, sft_args, bar):
    from tune_launch.training.prepare_progress import BusyProgress

    build = C.new_build_dir(root, f"{cfg.task}-{key}")
    try:
        with BusyProgress():  # the steps below that report no counts of their own still show they work
            info, tok_dir, files = _build_into(cfg, root, key, build, hubs, tokenizer, trained_key, sft_args, bar)
        C.publish(build, entry, key, files, info)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return info, tok_dir


def _build_into(cfg, root, key, build, hubs, tokenizer, trained_key, sft_args, bar):
    """Tokenizer training (when asked), then the task's preparation into `build`: (info, tokenizer folder, files)."""
    from tune_launch.training.prepare_progress import Progress

    tok_dir = None
    if cfg.task == "sft":
        from tune_launch.training.prepare_sft import sample_sft_texts, sft_rows, write_sft

        train, ev = sft_rows(cfg, build, hubs)
        if trained_key:
            budget = cfg.tokenizer.train_sample_bytes
            tok_dir = _trained_tokenizer(cfg, root, trained_key, lambda: sample_sft_texts(train, budget))
            tokenizer = _load_trained(cfg, tok_dir)
        t0 = time.perf_counter()
        info = write_sft(train, ev, tokenizer, _sft_args(cfg, sft_args), build)
        info["seconds"] = time.perf_counter() - t0
        files: dict[str, Any] = {}
    else:
        from tune_launch.training.prepare_text import text_parts, write_pretrain

        if trained_key:
            tok_dir = _trained_tokenizer(cfg, root, trained_key, _pretrain_sample(cfg, hubs))
            tokenizer = _load_trained(cfg, tok_dir)
        progress = Progress(_local_bytes(cfg), bar=bar)
        try:
            parts = [p for p in text_parts(cfg, hubs) if p.split == "eval" or not cfg.data.streaming]
            files, info = write_pretrain(cfg, tokenizer, parts, build, progress,
                                         _tokenizer_dir_for_workers(cfg, tokenizer, tok_dir, build))
        finally:
            progress.close()
            shutil.rmtree(build / WORKER_TOKENIZER, ignore_errors=True)
    info["tokenizer_dir"] = str(tok_dir) if tok_dir else None
    return info, tok_dir, files


def _load_trained(cfg: TrainingConfig, tok_dir: Path):
    from tune_launch.training.model import load_tokenizer

    return load_tokenizer(cfg, tok_dir)


def _tokenizer_dir_for_workers(cfg: TrainingConfig, tokenizer, tok_dir: Path | None, build: Path) -> str | None:
    """Worker processes (data.num_proc > 1) load the tokenizer from a folder: the trained one, or a copy saved
    in the build folder (removed before publishing)."""
    if not cfg.data.num_proc or cfg.data.num_proc <= 1:
        return None
    if tok_dir is not None:
        return str(tok_dir)
    folder = build / WORKER_TOKENIZER
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def _local_bytes(cfg: TrainingConfig) -> int | None:
    from tune_launch.training.sources import local_bytes

    sources = [s for _, s in _sources(cfg)]
    if not sources or any(s.path is None for s in sources):
        return None
    return sum(local_bytes(s) for s in sources)
