"""Prompt sets written by a language model (``prompts=llm``): ask, parse, filter, de-duplicate, cache.

An LLM (in-process ``transformers``, or an OpenAI-compatible server through :mod:`ddpo_cli.clients`) is asked for
text-to-image prompts on a topic, optionally of a template with named slots (``"{number} {things}"``). Each reply is
read one prompt per line, filtered by the user's rules and de-duplicated (:mod:`.filters`).
Rounds of requests go on until ``num_prompts`` survive (or ``max_rounds`` is reached: a one-line UserError).

Generation needs the run folder, which does not exist yet when the preflight builds the prompt set: the preflight
gets an empty :class:`LLMPromptSet` (no model loaded, no request sent); ``ddpo train`` calls
:meth:`LLMPromptSet.prepare` with ``<run>/prompts.json`` once the folder is known, which generates and writes the
file, or reads it back (resume, other processes) and never regenerates. ``ddpo sample`` / ``ddpo eval`` call
:meth:`LLMPromptSet.load`, which only reads. The file holds the prompts, their metadata, the settings that made them
and a hash of those settings (:mod:`.run_files`); a resumed run whose config no longer matches that hash stops with
a UserError.
"""
from __future__ import annotations

import hashlib
import json
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import transformers

from ..clients.openai_compatible import ChatClient
from ..errors import UserError, loading
from ..runtime import WEIGHT_DTYPES, derive_seed, resolve_precision, transformers_dtype
from .filters import Deduplicator, Embedder, Rules, Template, parse_lines
from .run_files import FILE_FORMAT, read_prompts_file, write_prompts_file
from .sets import PromptSet

DEFAULT_INSTRUCTION = ("You write prompts for a text-to-image model: short, concrete, visual descriptions of a "
                       "single scene.")
DEFAULT_DIVERSITY = "Make them varied: different subjects, settings and compositions; no two alike."
NOT_HASHED = ("server_url", "timeout", "max_retries", "cache")  # how to reach the LLM, not what it is asked


class TransformersLM:
    """A causal LM by hub id or local folder (``AutoTokenizer`` + ``AutoModelForCausalLM``). The request is the
    tokenizer's chat template (system + user turn) if it has one, else plain text; each reply is sampled after
    seeding torch with its own seed (the global RNG state is restored afterwards), so replies repeat given the seeds."""

    def __init__(self, model: str, max_new_tokens: int = 1024, temperature: float = 1.0, top_p: float = 0.95) -> None:
        self.model_id, self.max_new_tokens, self.temperature, self.top_p = model, max_new_tokens, temperature, top_p

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        with loading(f"the prompt LLM {self.model_id!r}", "give prompts.model as a hub id of a causal LM (downloaded "
                     "once) or a local folder saved with save_pretrained, or use prompts.backend=server"):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_id)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(self.model_id,
                                                                          **transformers_dtype(dtype))
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = device

    def encode(self, system: str, user: str) -> dict:
        """The token ids of one request ``{"input_ids": [1, L], "attention_mask": [1, L]}`` on the device."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                       {"role": "user", "content": user}],
                                                      tokenize=False, add_generation_prompt=True)
            inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:
            inputs = self.tokenizer(f"{system}\n\n{user}\n\n", return_tensors="pt")
        return {key: inputs[key].to(self.device) for key in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def complete(self, system: str, user: str, seeds: list[int]) -> list[str]:
        """One sampled reply per seed."""
        inputs = self.encode(system, user)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        replies = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                output = self.model.generate(**inputs, do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                             max_new_tokens=self.max_new_tokens, pad_token_id=pad)  # [1, L + new]
            replies.append(self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        return replies


class ServerLM:
    """An OpenAI-compatible ``/chat/completions`` server asked for text only
    (:class:`~ddpo_cli.clients.openai_compatible.ChatClient`: timeout, retries with backoff, refused redirects, API
    key only over https or to this machine); each request carries its ``seed`` (vLLM and OpenAI honour it)."""

    def __init__(self, url: str, model: str, max_new_tokens: int = 1024, temperature: float = 1.0,
                 top_p: float = 0.95, timeout: float = 120.0, max_retries: int = 3, concurrency: int = 8) -> None:
        self.client = ChatClient(url, model, "prompts=llm: prompt LLM server", "prompts.server_url", timeout,
                                 max_retries, concurrency=concurrency)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        """Nothing to load: the server holds the model."""

    def complete(self, system: str, user: str, seeds: list[int]) -> list[str]:
        """One reply per seed, in order."""
        return self.client.complete_all([
            {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
             "max_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": seed}
            for seed in seeds])


class LLMPromptSet(PromptSet):
    """``prompts=llm``: a prompt set generated by a language model once per run (see the module docstring).

    Built empty and cheaply (the preflight checks the settings only); usable after :meth:`prepare` (training) or
    :meth:`load` (sampling, evaluation), then it is a :class:`PromptSet` of the file's ``items``."""

    name = "llm"

    def __init__(self, topic: str, num_prompts: int = 50, template: Optional[str] = None, ask_for: str = "prompts",
                 instruction: Optional[str] = None, diversity: str = DEFAULT_DIVERSITY,
                 backend: str = "transformers", model: str = "Qwen/Qwen2.5-1.5B-Instruct",
                 server_url: str = "http://127.0.0.1:8000/v1", temperature: float = 1.0, top_p: float = 0.95,
                 max_new_tokens: int = 1024, prompts_per_request: int = 25, requests_per_round: int = 4,
                 max_rounds: int = 5, seed: int = 0, min_words: int = 2, max_words: Optional[int] = 40,
                 required_words: Optional[list[str]] = None, require: str = "all",
                 forbidden_words: Optional[list[str]] = None, must_match_template: bool = True,
                 near_duplicate_threshold: Optional[float] = 0.9,
                 embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2", timeout: float = 120.0,
                 max_retries: int = 3, cache: Optional[str] = None) -> None:
        self.settings = dict(locals())  # every parameter by name: the file records them, the hash covers most
        del self.settings["self"]
        check_settings(self.settings)
        self.template = Template(template) if template else None
        self.rules = Rules(min_words, max_words, required_words or (), require, forbidden_words or (),
                           self.template if must_match_template else None)
        self.cache = cache
        self.prepared: PromptSet | None = None

    # ----------------------------------------------------------------------------------------- as a prompt set
    def ready(self) -> PromptSet:
        """The prepared set (a RuntimeError before :meth:`prepare` or :meth:`load`: a bug, not a user mistake)."""
        if self.prepared is None:
            raise RuntimeError("the prompts=llm set is used before prepare(path, device) or load(path) filled it")
        return self.prepared

    @property
    def items(self) -> list[tuple[str, dict]]:
        return self.ready().items

    # ----------------------------------------------------------------------------------------- the run's file
    def settings_hash(self) -> str:
        """sha256 (hex) of the settings that decide which prompts come out (not how the server is reached)."""
        hashed = {key: value for key, value in self.settings.items() if key not in NOT_HASHED}
        return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode("utf-8")).hexdigest()

    def prepare(self, path: Path, device: torch.device, resuming: bool = False) -> None:
        """Training: make ``path`` (``<run>/prompts.json``) hold this set and use it. With ``cache``, that file is
        copied there; else an existing ``path`` is read back (its settings hash must match); else, unless
        ``resuming`` (a resumed run never regenerates), the LLM generates the set and it is written."""
        path = Path(path)
        if self.cache:
            data = read_prompts_file(Path(self.cache).expanduser())
            if path.exists() and read_prompts_file(path)["prompts"] != data["prompts"]:
                raise UserError(f"{path} differs from prompts.cache={self.cache}: resume with the run's own "
                                f"prompts settings, or start a new run")
        elif path.exists():
            data = self.checked(read_prompts_file(path), path)
        elif resuming:
            raise UserError(f"{path} is missing, and the prompts of a resumed run are never regenerated: restore "
                            f"the file, or give prompts.cache=<a prompts.json> to train on that one")
        else:
            data = self.generate(device)
        if not path.exists():
            write_prompts_file(path, data)
        self.use(data)

    def load(self, run_file: Path | None) -> None:
        """Sampling / evaluation: use ``cache`` if given, else a run's file (its settings hash must match). Never
        generates; UserError without either."""
        if self.cache:
            data = read_prompts_file(Path(self.cache).expanduser())
        elif run_file is None:
            raise UserError("prompts=llm sets are made by ddpo train: give run=<a run trained with prompts=llm>, or "
                            "prompts.cache=<its prompts.json>")
        else:
            data = self.checked(read_prompts_file(run_file), run_file)
        self.use(data)

    def checked(self, data: dict, path: Path) -> dict:
        """``data`` if it was made with this config's settings; else a UserError naming the keys that differ."""
        if data.get("settings_hash") == self.settings_hash():
            return data
        saved = data.get("settings", {})
        changed = [key for key in self.settings if key not in NOT_HASHED and saved.get(key) != self.settings[key]]
        raise UserError(f"{path} was generated with other prompts settings ({', '.join(changed) or 'unknown'}): "
                        f"use the run's own prompts settings (drop those prompts.* overrides), or start a new run")

    def use(self, data: dict) -> None:
        self.prepared = PromptSet([(row["prompt"], dict(row["metadata"])) for row in data["prompts"]], name=self.name)

    # ----------------------------------------------------------------------------------------- generation
    def generate(self, device: torch.device) -> dict:
        """Ask the LLM in rounds of ``requests_per_round`` requests until ``num_prompts`` prompts survive the rules
        and de-duplication; the content of the prompts file. UserError when ``max_rounds`` rounds are not enough."""
        s = self.settings
        lm = make_lm(s)
        lm.load(device, WEIGHT_DTYPES[resolve_precision("auto", device)])  # fp32 on a CPU
        embed = Embedder(s["embedding_model"], device) if s["near_duplicate_threshold"] is not None else None
        dedup = Deduplicator(s["near_duplicate_threshold"], embed)
        system, user = s["instruction"] or DEFAULT_INSTRUCTION, self.request()
        kept, dropped, lines = [], Counter(), 0
        for round_index in range(s["max_rounds"]):
            seeds = [derive_seed(s["seed"], "llm", round_index, i) for i in range(s["requests_per_round"])]
            candidates = [line for reply in lm.complete(system, user, seeds) for line in parse_lines(reply)]
            lines += len(candidates)
            fresh, reasons = dedup.keep(self.passing(candidates, dropped))
            kept += fresh
            dropped.update(reasons)
            if len(kept) >= s["num_prompts"]:
                break
        else:  # no round was enough
            raise UserError(self.shortfall(len(kept), lines, dropped))
        prompts = [{"prompt": prompt, "metadata": self.metadata(prompt)} for prompt in kept[:s["num_prompts"]]]
        return {"format": FILE_FORMAT, "backend": s["backend"], "model": s["model"], "seed": s["seed"],
                "settings": s, "settings_hash": self.settings_hash(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "stats": {"rounds": round_index + 1, "requests": (round_index + 1) * s["requests_per_round"],
                          "lines": lines, "survived": len(kept), "dropped": dict(dropped)},
                "prompts": prompts}

    def request(self) -> str:
        """The user turn of every request: the topic, the form (template or slot values) and the diversity text."""
        s, count = self.settings, self.settings["prompts_per_request"]
        if s["ask_for"] == "slots":
            slots = self.template.slots
            return (f"Topic: {s['topic']}.\nText-to-image prompts of the form \"{self.template.text}\" are made "
                    f"from values of {', '.join(slots)}. Write {count} different lines, each giving one value of "
                    f"each, in that order, separated by \" | \" (like: {' | '.join(f'<{slot}>' for slot in slots)})."
                    f"\n{s['diversity']}\nAnswer with the lines only, one per line.")
        form = (f"Each prompt has the form \"{self.template.text}\" (fill in the parts in braces).\n"
                if self.template else "")
        return (f"Write {count} different text-to-image prompts about: {s['topic']}.\n{form}{s['diversity']}\n"
                f"Answer with the prompts only, one per line.")

    def passing(self, candidates: list[str], dropped: Counter) -> list[str]:
        """The candidate lines (slot values filled into the template first) that pass the rules; counts the rest."""
        passing = []
        for line in candidates:
            prompt = self.template.fill(line) if self.settings["ask_for"] == "slots" else line
            reason = "not the slot values" if prompt is None else self.rules.rejects(prompt)
            if reason:
                dropped[reason] += 1
            else:
                passing.append(prompt)
        return passing

    def metadata(self, prompt: str) -> dict:
        """The template's slot values of ``prompt`` (empty without a template or when it does not fit)."""
        return (self.template.parse(prompt) or {}) if self.template else {}

    def shortfall(self, survived: int, lines: int, dropped: Counter) -> str:
        s = self.settings
        reasons = ", ".join(f"{count} {reason}" for reason, count in dropped.most_common()) or "none"
        return (f"prompts=llm: only {survived} of prompts.num_prompts={s['num_prompts']} prompts survived "
                f"{s['max_rounds']} rounds of {s['requests_per_round']} requests ({lines} lines; dropped: {reasons}): "
                f"raise prompts.max_rounds or prompts.requests_per_round, loosen the filters or "
                f"prompts.near_duplicate_threshold, or lower prompts.num_prompts")


def make_lm(settings: dict):
    """The backend of ``settings["backend"]``: in-process ``transformers`` or an OpenAI-compatible ``server``."""
    s = settings
    if s["backend"] == "transformers":
        return TransformersLM(s["model"], s["max_new_tokens"], s["temperature"], s["top_p"])
    return ServerLM(s["server_url"], s["model"], s["max_new_tokens"], s["temperature"], s["top_p"], s["timeout"],
                    s["max_retries"])


def check_settings(s: dict) -> None:
    """Value checks of :class:`LLMPromptSet`'s settings (the types are checked by the config). Raises UserError."""
    checks = [
        (bool(str(s["topic"]).strip()), "prompts.topic is empty: describe the prompts, e.g. 'animals doing "
                                        "everyday activities'"),
        (s["num_prompts"] >= 1, f"prompts.num_prompts={s['num_prompts']}: use >= 1"),
        (s["backend"] in ("transformers", "server"),
         f"prompts.backend={s['backend']!r}: choose transformers (in-process) or server (OpenAI-compatible)"),
        (s["ask_for"] in ("prompts", "slots"), f"prompts.ask_for={s['ask_for']!r}: choose prompts or slots"),
        (s["ask_for"] == "prompts" or bool(s["template"]),
         "prompts.ask_for=slots needs prompts.template, e.g. '{number} {things}'"),
        (s["temperature"] > 0, f"prompts.temperature={s['temperature']}: use > 0 (replies are sampled)"),
        (0 < s["top_p"] <= 1, f"prompts.top_p={s['top_p']}: use a value in (0, 1]"),
        (urllib.parse.urlsplit(s["server_url"]).scheme in ("http", "https"),
         f"prompts.server_url={s['server_url']!r}: give an http:// or https:// address of an OpenAI-compatible API"),
        (s["min_words"] >= 0 and (s["max_words"] is None or s["max_words"] >= max(s["min_words"], 1)),
         f"prompts.min_words={s['min_words']}, prompts.max_words={s['max_words']}: need 0 <= min_words <= "
         f"max_words (or max_words=null)"),
        (s["require"] in ("all", "any"), f"prompts.require={s['require']!r}: choose all or any (of required_words)"),
        (s["near_duplicate_threshold"] is None or 0 < s["near_duplicate_threshold"] <= 1,
         f"prompts.near_duplicate_threshold={s['near_duplicate_threshold']}: use a cosine similarity in (0, 1], or "
         f"null to keep near-duplicates"),
        (s["timeout"] > 0 and s["max_retries"] >= 0,
         f"prompts.timeout={s['timeout']}, prompts.max_retries={s['max_retries']}: need timeout > 0, max_retries >= 0"),
    ]
    for key in ("max_new_tokens", "prompts_per_request", "requests_per_round", "max_rounds"):
        checks.append((s[key] >= 1, f"prompts.{key}={s[key]}: use >= 1"))
    for ok, message in checks:
        if not ok:
            raise UserError(message)
