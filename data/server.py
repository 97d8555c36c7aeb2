"""`dspark generate backend=server`: the answers come from an OpenAI-compatible server (vLLM, SGLang,
llama.cpp's llama-server, llama-cpp-python's server) instead of the in-process runtime.

The prompt is the target's chat template applied here, exactly as in-process, and sent as token ids
(`/v1/completions` takes a token list on vLLM and SGLang; llama-server's native `/completion` too);
a server that refuses a token list (llama-cpp-python) gets the templated text, and its reported prompt
length is checked against ours. The answer's token ids are kept when the server returns them (vLLM,
recent SGLang: `return_token_ids` → `choices[0].token_ids`; llama-server: `/completion` with
`return_tokens` → `tokens`); otherwise the text is re-tokenized with the target tokenizer and
each row records whether the round trip held (`roundtrip`). The standard library only: urllib for HTTP,
a thread per request, `max_in_flight` at once, retries with exponential backoff on connection errors,
timeouts, 429 and 5xx. A 4xx answer, malformed JSON or an empty answer is counted and skipped (the
prompt stays undone, so a re-run asks again); it is never stored.
"""
from __future__ import annotations

import http.client
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace

from dspark.core.errors import DSparkError

BACKOFF_S = 0.5          # first retry after 0.5 s, then 1, 2, 4, ...
NETWORK = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError)


class Rejected(Exception):
    """The server refused a request: a 4xx status (any error status to a probe request)."""


@dataclass
class Server:
    url: str
    model: str | None
    api: str = "auto"                 # auto | openai (/v1/completions) | llamacpp (llama-server /completion)
    timeout_s: float = 600.0
    retries: int = 3
    max_in_flight: int = 4
    prompt_as: str = "ids"            # ids, or text where the server refuses a token list
    top_k_off: int = -1               # the top_k value the server reads as "off"
    owned_by: str | None = None
    counts: dict = field(default_factory=lambda: dict.fromkeys(
        ("requests", "retries", "malformed", "empty", "rejected", "prompt_mismatch"), 0))
    first_problem: str | None = None
    target: object = None             # set by check()
    unanswered: int = 0               # prompts of this run without a valid answer
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_cfg(cls, s) -> "Server":
        url = str(s.url).rstrip("/")
        url = url[:-3] if url.endswith("/v1") else url
        return cls(url=url, model=s.model, api=s.api, timeout_s=float(s.timeout_s), retries=int(s.retries),
                   max_in_flight=int(s.max_in_flight))

    def identity(self) -> dict:
        """What a row depends on besides the sampling settings: which server and model made it."""
        return {"url": self.url, "model": self.model, "api": self.api}

    # ------------------------------------------------------------------ HTTP
    def _call(self, path: str, body: dict | None = None, probe: bool = False) -> bytes:
        """GET (no body) or POST JSON; retries connection errors, timeouts, 429 and 5xx with exponential
        backoff. Raises Rejected on another 4xx (on any error status when `probe`: llama-cpp-python answers
        a request it cannot validate with 500) and DSparkError once the retries are spent."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    return r.read()
            except urllib.error.HTTPError as e:
                msg = e.read()[:300].decode("utf-8", "replace").strip()
                if probe or (e.code < 500 and e.code != 429):
                    raise Rejected(f"HTTP {e.code} from {self.url}{path}: {msg}") from None
                why = f"HTTP {e.code} {msg}"
            except NETWORK as e:
                why = str(getattr(e, "reason", None) or e) or type(e).__name__
            if attempt < self.retries:
                self._count("retries")
                time.sleep(BACKOFF_S * 2 ** attempt)
        raise DSparkError(f"server {self.url} did not answer {path} ({why}) after {self.retries} retries: "
                          "start it or fix server.url= (finished chunks are kept; a re-run resumes)")

    def _count(self, key: str, problem: str | None = None) -> None:
        with self._lock:
            self.counts[key] += 1
            if problem and self.first_problem is None:
                self.first_problem = problem

    # ------------------------------------------------------------------ checks before any write
    def check(self, target) -> None:
        """The server answers, serves `model` (null: its only model), and takes the probe prompt; `target`
        (its tokenizer) templates the prompts and reads the answers from now on."""
        self.target = target
        try:
            listing = json.loads(self._call("/v1/models"))
            served = {m["id"]: m.get("owned_by") for m in listing["data"]}
        except (ValueError, KeyError, TypeError, Rejected) as e:
            raise DSparkError(f"server {self.url} gave no model list at /v1/models ({e}): "
                              "point server.url= at an OpenAI-compatible server") from None
        if self.model is None and len(served) == 1:
            self.model = next(iter(served))
        if self.model not in served:
            raise DSparkError(f"server {self.url} does not serve model '{self.model}' (it serves: "
                              f"{', '.join(sorted(served)) or 'nothing'}): set server.model=<one of them>")
        self.owned_by = served[self.model]
        if self.api == "auto":
            self.api = "llamacpp" if self.owned_by == "llamacpp" else "openai"
        # the first request form the server takes: the prompt as ids, else as text (llama-cpp-python wants a
        # string); top_k off as -1 (SGLang), else 0 (llama-cpp-python: >= 0)
        ids, why = target.encode_chat("probe"), None
        for self.top_k_off in (-1, 0):
            for self.prompt_as in ("ids", "text") if self.api == "openai" else ("ids",):
                try:
                    self.complete(ids, 2, 0.0, 1.0, 0, 0, probe=True)
                    return
                except Rejected as e:
                    why = e
        raise DSparkError(f"server {self.url} refused the probe request: {why}")

    # ------------------------------------------------------------------ one request
    def _body(self, prompt, n: int, temperature: float, top_p: float, top_k: int, seed: int) -> tuple[str, dict]:
        # explicit values for every sampler a server may turn on by default (llama.cpp: top_k 40,
        # min_p 0.05, repeat_penalty 1.1); seeds fit 31 bits
        common = {"temperature": temperature, "top_p": top_p, "top_k": top_k or self.top_k_off, "min_p": 0.0,
                  "seed": seed % 2**31, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
        if self.api == "llamacpp":
            return "/completion", {"prompt": prompt, "n_predict": n, "return_tokens": True, "cache_prompt": True,
                                   "stream": False, **common}
        return "/v1/completions", {"model": self.model, "prompt": prompt, "max_tokens": n, "stream": False,
                                   "return_token_ids": True, "repetition_penalty": 1.0, **common}

    def prompt(self, ids: list[int]):
        """What the request carries: our prompt ids, or their text (the chat template's special tokens kept)."""
        return ids if self.prompt_as == "ids" else self.target.tokenizer.decode(ids, skip_special_tokens=False)

    def complete(self, ids: list[int], n: int, temperature: float, top_p: float, top_k: int, seed: int,
                 probe: bool = False, prompt=None):
        """One answer as SimpleNamespace(text, ids or None, stop: bool, prompt_tokens, prompt_ids,
        completion_tokens), or None when it was rejected, malformed or empty (counted); `probe` raises
        instead. `prompt`: self.prompt(ids) when already made (the tokenizer stays in the main thread)."""
        prompt = self.prompt(ids) if prompt is None else prompt
        path, body = self._body(prompt, n, temperature, top_p, top_k, seed)
        self._count("requests")
        try:
            raw = self._call(path, body, probe)
        except Rejected as e:
            if probe:
                raise
            self._count("rejected", str(e))
            return None
        try:
            ans = _parse(json.loads(raw), self.api)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            if probe:
                raise DSparkError(f"server {self.url} answered {path} with malformed JSON ({e}): "
                                  f"{raw[:200]!r}") from None
            self._count("malformed", f"{path}: {e}: {raw[:200]!r}")
            return None
        if not ans.text and not ans.ids:
            if probe:
                return ans
            self._count("empty", f"{path}: an empty answer: {raw[:200]!r}")
            return None
        if ans.prompt_ids is not None and ans.prompt_ids != ids or ans.prompt_tokens not in (None, len(ids)):
            self._count("prompt_mismatch", f"the server's prompt ({ans.prompt_tokens} tokens) is not ours ({len(ids)})")
        return ans

    # ------------------------------------------------------------------ the run
    def generate(self, todo: list[tuple[str, list[int]]], cfg, seeds: list[int], on_finish) -> None:
        """Ask for every (text, ids) of `todo`, at most `max_in_flight` at once; `on_finish(i, state)` runs
        in this thread with state.generated / finish_reason / extra as each valid answer arrives."""
        results, jobs, running = queue.Queue(), iter(range(len(todo))), 0

        def ask(i: int, prompt) -> None:
            try:
                results.put((i, self.complete(todo[i][1], cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                                              seeds[i], prompt=prompt), None))
            except BaseException as e:   # handed to the main thread
                results.put((i, None, e))

        while True:
            while running < self.max_in_flight and (i := next(jobs, None)) is not None:
                # daemon threads: an interrupted run does not wait for the requests still in flight
                threading.Thread(target=ask, args=(i, self.prompt(todo[i][1])), daemon=True).start()
                running += 1
            if not running:
                return
            i, ans, err = results.get()
            running -= 1
            if err is not None:
                raise err
            if ans is None:
                self.unanswered += 1
            else:
                on_finish(i, to_row(ans, self.target, cfg.max_new_tokens))

    def summary(self, rows: list[dict]) -> dict:
        """For generate.json: the server's identity, how the rows' ids were obtained, the counters."""
        from_server = sum(r.get("ids_from") == "server" for r in rows)
        checked = [r["roundtrip"] for r in rows if "roundtrip" in r]
        return {**self.identity(), "owned_by": self.owned_by, "prompt_as": self.prompt_as,
                "max_in_flight": self.max_in_flight, "ids_from_server": from_server,
                "ids_retokenized": len(rows) - from_server,
                "roundtrip_mismatch_rate": (checked.count(False) / len(checked)) if checked else None,
                "this_run": dict(self.counts), "first_problem": self.first_problem}


def mixing_error(folder, old: dict | None, new: dict | None) -> str:
    """The one error line for chunks another backend or server made (settings' `server` entries)."""
    def made_by(s):
        return f"server {s['url']} (model {s['model']}, api {s['api']})" if s else "backend=inprocess"
    return (f"'{folder}' holds chunks made by {made_by(old)}, this run uses {made_by(new)}: rows of two "
            "backends or servers are not mixed; pass a new output_dir= or delete that folder")


def _parse(data: dict, api: str) -> SimpleNamespace:
    """The fields we use from an answer, whatever the server; a missing one raises (malformed)."""
    if api == "llamacpp":   # llama-server /completion
        return SimpleNamespace(text=data["content"], ids=_int_list(data.get("tokens")) or None,
                               stop=data.get("stop_type") in ("eos", "word"), prompt_tokens=data.get("tokens_evaluated"),
                               prompt_ids=None, completion_tokens=data.get("tokens_predicted"))
    choice, usage = data["choices"][0], data.get("usage") or {}
    if not isinstance(choice["text"], str):
        raise TypeError("choices[0].text is not a string")
    return SimpleNamespace(text=choice["text"], ids=_int_list(choice.get("token_ids")), stop=choice.get("finish_reason") == "stop",
                           prompt_tokens=usage.get("prompt_tokens"), prompt_ids=_int_list(choice.get("prompt_token_ids")),
                           completion_tokens=usage.get("completion_tokens"))


def _int_list(v) -> list[int] | None:
    return list(v) if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v) \
        else None


def to_row(ans, target, max_new_tokens: int) -> SimpleNamespace:
    """The generated ids in the in-process format: cut after the first end-of-sequence id (finish "eos");
    a server that stopped on one without returning it gets the tokenizer's eos appended."""
    eos = set(target.eos_token_ids)
    stop_id = target.tokenizer.eos_token_id if target.tokenizer.eos_token_id in eos else min(eos, default=None)
    retok = target.tokenizer.encode(ans.text, add_special_tokens=False)
    if ans.ids is not None:
        gen, ids_from = list(ans.ids), "server"
        roundtrip = retok == [t for t in gen if t not in eos]
    else:
        gen, ids_from = retok, "retokenized"
        roundtrip = target.tokenizer.decode(retok) == ans.text and (
            ans.completion_tokens is None or ans.completion_tokens in (len(retok), len(retok) + ans.stop))
    cut = next((j for j, t in enumerate(gen) if t in eos), None)
    if cut is not None:
        gen = gen[:cut + 1]
    elif ans.stop and stop_id is not None:
        gen = gen + [stop_id]
    gen = gen[:max_new_tokens]
    finish = "eos" if gen and gen[-1] in eos else "length"
    return SimpleNamespace(generated=gen, finish_reason=finish, extra={"ids_from": ids_from, "roundtrip": roundtrip})
