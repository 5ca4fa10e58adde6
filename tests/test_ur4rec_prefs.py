"""LLM preferences: the openai backend against a real local HTTP server, the template, no leaks."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from rayrec.cli import main
from rayrec.config.schema import JobConfig
from rayrec.errors import ConfigError, RayrecError
from rayrec.prefs.generate import (
    CACHE_FILE,
    ITEMS_FILE,
    USERS_FILE,
    Selection,
    build_requests,
    generate_prefs,
)

KEY = "sk-test-SECRET-0123456789"


class FakeLLM(ThreadingHTTPServer):
    """OpenAI-compatible enough: GET /v1/models, POST /v1/chat/completions.

    The first completion request gets a 429; a prompt containing ``malformed_marker`` gets a
    body without ``choices``. Every request's Authorization header is recorded.
    """

    def __init__(self, malformed_marker: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.marker, self.posts, self.auth, self.lock = malformed_marker, [], [], threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict, headers=()):
        data = json.dumps(body).encode()
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.auth.append(self.headers.get("Authorization"))
        self._send(200, {"data": [{"id": "fake"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.posts.append(body)
            srv.auth.append(self.headers.get("Authorization"))
            first = len(srv.posts) == 1
        prompt = body["messages"][-1]["content"]
        if first:
            return self._send(429, {"error": "slow down"}, [("Retry-After", "0")])
        if srv.marker in prompt:
            return self._send(200, {"id": "x", "object": "chat.completion"})
        text = f"Likes what {body['model']} saw ({len(prompt)} chars)."
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 20}})


@pytest.fixture
def items_of(tiny_dataset):
    return pd.read_parquet(tiny_dataset / "items.parquet").set_index("item_idx")


@pytest.fixture
def llm(items_of):
    srv = FakeLLM(malformed_marker=f"Title: {items_of.loc[2, 'title']}\n")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def job(data, tmp_path, **prefs) -> JobConfig:
    return JobConfig.model_validate({
        "data": {"path": str(data), "prepare_if_missing": False},
        "model": {"name": "ur4rec", "prefs": {"out_dir": str(tmp_path / "prefs"), "backoff_s": 0.01,
                                              "api_key_env": "RAYREC_TEST_LLM_KEY", "max_concurrency": 3,
                                              "price_per_1k_prompt": 0.5, "price_per_1k_completion": 2.0, **prefs}},
        "tracking": {"enabled": False},
    })


def test_openai_backend_retries_caches_and_reports(tiny_dataset, tmp_path, llm, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("RAYREC_TEST_LLM_KEY", KEY)
    cfg = job(tiny_dataset, tmp_path, backend="openai", base_url=llm.url, model="qwen-fake")
    sel = Selection(num_users=3, num_items=3)  # items 1, 2 (malformed), 3
    s = generate_prefs(cfg, tiny_dataset, sel)
    assert (s.requested, s.generated, s.failed, s.cached) == (6, 5, 1, 0)
    assert len(llm.posts) == 7  # one 429 retried, the malformed one not retried
    assert "malformed response" in s.errors[0] and "item 2" in s.errors[0]
    assert (s.prompt_tokens, s.completion_tokens) == (500, 100) and s.cost == pytest.approx(0.25 + 0.2)
    assert set(llm.auth) == {f"Bearer {KEY}"}
    prefs = pd.read_parquet(tmp_path / "prefs" / USERS_FILE)
    assert prefs["user_idx"].tolist() == [1, 2, 3] and prefs["pref_text"].str.contains("qwen-fake").all()
    assert pd.read_parquet(tmp_path / "prefs" / ITEMS_FILE)["item_idx"].tolist() == [1, 3]
    # interrupted/finished runs resume from the cache: only the malformed request is sent again
    again = generate_prefs(cfg, tiny_dataset, sel)
    assert (again.cached, again.generated, again.failed) == (5, 0, 1) and len(llm.posts) == 8
    # the key is nowhere on disk or in the logs
    for f in (tmp_path / "prefs").iterdir():
        assert KEY not in f.read_bytes().decode("utf-8", "ignore"), f
    assert KEY not in caplog.text and KEY not in repr(cfg) and KEY not in cfg.model_dump_json()


def test_missing_key_and_dead_endpoint_fail_before_any_request(tiny_dataset, tmp_path, llm, monkeypatch):
    monkeypatch.delenv("RAYREC_TEST_LLM_KEY", raising=False)
    cfg = job(tiny_dataset, tmp_path, backend="openai", base_url=llm.url)
    with pytest.raises(ConfigError, match="environment variable RAYREC_TEST_LLM_KEY, which is not set"):
        generate_prefs(cfg, tiny_dataset, Selection(num_users=2, num_items=0))
    assert llm.posts == [] and llm.auth == []
    monkeypatch.setenv("RAYREC_TEST_LLM_KEY", KEY)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cfg = job(tiny_dataset, tmp_path, backend="openai", base_url=dead, timeout_s=2)
    with pytest.raises(RayrecError, match=f"LLM endpoint {dead} is unreachable") as e:
        generate_prefs(cfg, tiny_dataset, Selection(num_users=2, num_items=0))
    assert KEY not in str(e.value) and not (tmp_path / "prefs" / CACHE_FILE).exists()


def test_preferences_use_only_the_training_sequence(tiny_dataset, tmp_path):
    cfg = job(tiny_dataset, tmp_path)
    reqs, facts = build_requests(tiny_dataset, cfg.model.prefs, Selection(num_items=0))
    train = pd.read_parquet(tiny_dataset / "train.parquet").set_index("user_idx")["seq"]
    held = pd.concat([pd.read_parquet(tiny_dataset / f"{s}.parquet") for s in ("valid", "test")])
    held = held.groupby("user_idx")["target"].agg(set)
    assert len(reqs) == 300
    for r in reqs:
        used = set(r.facts["items"])
        assert used <= set(train[r.idx].tolist())
        assert not used & held[r.idx]
        for target in held[r.idx]:  # no held-out title in the prompt either
            assert f". {facts[target]['title']} (" not in r.prompt_text()


def test_template_backend_offline_and_feeds_features(tiny_dataset, tmp_path):
    cfg = job(tiny_dataset, tmp_path, history_items=10)
    s = generate_prefs(cfg, tiny_dataset, Selection(num_users=5, num_items=4))
    assert (s.generated, s.failed, s.cost) == (9, 0, 0.0)
    text = pd.read_parquet(tmp_path / "prefs" / USERS_FILE)["pref_text"].iloc[0]
    assert text.startswith("Mostly into ") and "Recently enjoyed" in text
    s2 = generate_prefs(cfg, tiny_dataset, Selection(num_users=3, skip_users=5, num_items=0))
    assert s2.generated == 3 and len(pd.read_parquet(tmp_path / "prefs" / USERS_FILE)) == 8  # batches add up
    from rayrec.data.features import gather_inputs

    inputs = gather_inputs(cfg.model.features, tiny_dataset, 300, tmp_path / "prefs")
    assert inputs.sources["user_text"].endswith(USERS_FILE) and inputs.user_texts[0] == text


def test_cli_dry_run_prints_prompts_and_needs_no_key(tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAYREC_TEST_LLM_KEY", raising=False)
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job(tiny_dataset, tmp_path, backend="openai").model_dump(mode="json")))
    assert main(["prefs", "generate", str(path), "--num-users", "2", "--num-items", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- user") == 2 and out.count("--- item") == 1 and "describe this user's taste" in out
    assert not (tmp_path / "prefs").exists()
