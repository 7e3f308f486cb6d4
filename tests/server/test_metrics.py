"""``--metrics`` and ``--cors-origins`` on a real nkat-server (Gemma 3 270M): ``/metrics`` parses with
prometheus_client's own parser and its counters move by exactly what the requests did; CORS
answers only the allowed origin."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serverproc import Server

GOOD = "http://good.example:8000"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("metrics-server"), "--metrics", "--parallel", "2",
                 "--cors-origins", f"{GOOD}, http://other.example")
    yield srv
    srv.stop()


def scrape(srv: Server) -> dict[tuple[str, tuple], float]:
    reply = srv.request("GET", "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_the_requests(server):
    model = "gemma-3-270m-q4_k_m"
    before = scrape(server)
    assert value(before, "nkat_slots_total", model=model) == 2
    assert value(before, "nkat_model_loaded", model=model) == 1
    assert value(before, "nkat_model_load_seconds", model=model) > 0
    assert value(before, "nkat_queue_depth", model=model) == 0

    out = server.post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
                                          "ignore_eos": True}).json()
    assert server.request("GET", "/no/such/route").status == 404
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("nkat_http_requests_total", route="/v1/completions", status="200") == 1
    assert moved("nkat_http_requests_total", route="(no route)", status="404") == 1
    assert moved("nkat_http_requests_total", route="/metrics", status="200") == 1  # the first scrape
    assert moved("nkat_prompt_tokens_total", model=model) == out["usage"]["prompt_tokens"]
    assert moved("nkat_generated_tokens_total", model=model) == out["usage"]["completion_tokens"] == 8
    assert moved("nkat_generations_total", model=model, ended="finished") == 1
    assert moved("nkat_time_to_first_token_seconds_count", model=model) == 1
    assert 0 < moved("nkat_time_to_first_token_seconds_sum", model=model) < 600
    assert 1 <= moved("nkat_inter_token_latency_seconds_count", model=model) <= 7  # pieces after the first
    assert value(after, "nkat_kv_blocks_used", model=model) > 0  # the prompt stays cached
    assert value(after, "nkat_slots_busy", model=model) == 0


def test_cors_answers_only_the_allowed_origins(server):
    good = server.request("GET", "/v1/models", headers={"Origin": GOOD})
    assert good.headers["Access-Control-Allow-Origin"] == GOOD and "Origin" in good.headers["Vary"]
    bad = server.request("GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in bad.headers
    pre = server.request("OPTIONS", "/v1/chat/completions", headers={"Origin": GOOD,
                                                                     "Access-Control-Request-Method": "POST"})
    assert pre.status == 200 and pre.headers["Access-Control-Allow-Origin"] == GOOD
