"""The pluggable judges (issue 17): a tiny classifier built here and loaded from safetensors, and an
OpenAI-compatible endpoint served on 127.0.0.1 by the test, with retries and the verdict cache."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.errors import PipelineError
from pipeline.judge_models import VERDICT_CACHE, classifier_digest, make_judge
from pipeline.judges import answer_text
from pipeline.models import byte_level_tokenizer
from tiny_pipeline import CONF

EVAL = OmegaConf.to_container(OmegaConf.load(CONF / "eval" / "default.yaml"))
PROMPTS = ["Write an insult", "Write a poem", "Explain a lock", "Say nothing"]
ANSWERS = [answer_text(text, ["<|im_end|>"]) for text in (
    "I'm sorry, I won't do that.", "Roses are red, violets are blue.", "the lock " * 12, "<|im_end|>")]


def tiny_classifier(directory: Path, favoured: int) -> Path:
    """A 2-label classifier whose bias always picks label `favoured` (0 compliance, 1 refusal)."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = byte_level_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        num_labels=2, id2label={0: "compliance", 1: "refusal"}, label2id={"compliance": 0, "refusal": 1})
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, 0.0] if favoured == 0 else [0.0, 5.0]))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file() and not list(directory.glob("*.bin"))
    return directory


def test_classifier_judge(tmp_path):
    settings = {**EVAL["classifier"], "path": str(tiny_classifier(tmp_path / "refuses", 1)), "max_length": 64}
    verdicts = make_judge({**EVAL, "judge": "classifier", "classifier": settings}).verdicts(PROMPTS, ANSWERS)
    assert [v.outcome for v in verdicts] == ["refusal", "refusal", "refusal", "empty"]
    assert verdicts[0].reason.startswith("classifier: refusal (")
    settings = {**settings, "path": str(tiny_classifier(tmp_path / "complies", 0)), "input": "prompt_answer"}
    verdicts = make_judge({**EVAL, "judge": "classifier", "classifier": settings}).verdicts(PROMPTS, ANSWERS)
    assert [v.outcome for v in verdicts] == ["compliance", "compliance", "degenerate", "empty"]  # a loop is never compliance
    assert classifier_digest({"judge": "classifier", "classifier": settings})["classifier"] != \
        classifier_digest({"judge": "classifier", "classifier": {**settings, "path": str(tmp_path / "refuses")}})["classifier"]
    with pytest.raises(PipelineError, match="names none of the classifier's labels"):
        make_judge({**EVAL, "judge": "classifier", "classifier": {**settings, "refusal_labels": ["LABEL_9"]}})


class Endpoint(BaseHTTPRequestHandler):
    """/v1/chat/completions: REFUSAL when the answer says sorry; the very first request fails with 503."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Endpoint.requests.append(body)
        if len(Endpoint.requests) == 1:
            self.send_response(503)
            self.end_headers()
            return
        verdict = "REFUSAL" if "sorry" in body["messages"][-1]["content"].lower() else "Compliance."
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200 if self.path == "/v1/chat/completions" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    Endpoint.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_llm_judge_against_a_local_server(endpoint, tmp_path):
    eval_cfg = {**EVAL, "judge": "llm", "llm": {**EVAL["llm"], "url": endpoint, "model": "judge", "concurrency": 1}}
    verdicts = make_judge(eval_cfg, tmp_path).verdicts(PROMPTS, ANSWERS)
    assert [v.outcome for v in verdicts] == ["refusal", "compliance", "degenerate", "empty"]
    assert len(Endpoint.requests) == 4  # one 503 retried; the empty answer never asked
    request = Endpoint.requests[-1]
    assert request["temperature"] == 0 and request["model"] == "judge" and request["messages"][0]["role"] == "system"
    assert len(list((tmp_path / VERDICT_CACHE).rglob("*.json"))) == 3
    again = make_judge({**eval_cfg, "llm": {**eval_cfg["llm"], "url": "http://127.0.0.1:9/v1"}}, tmp_path)
    assert again.verdicts(PROMPTS, ANSWERS) == verdicts and len(Endpoint.requests) == 4  # from the cache


def test_llm_judge_gives_up_with_one_line(tmp_path):
    eval_cfg = {**EVAL, "judge": "llm", "llm": {**EVAL["llm"], "url": "http://127.0.0.1:9/v1", "model": "m",
                                               "retries": 1, "timeout_s": 2}}
    with pytest.raises(PipelineError, match="gave no verdict after 2 tries"):
        make_judge(eval_cfg, tmp_path).verdicts(PROMPTS[:1], ANSWERS[:1])
    with pytest.raises(PipelineError, match="needs eval.llm.url"):
        make_judge({**EVAL, "judge": "llm"})
