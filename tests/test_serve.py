"""The server on the tiny random model (CPU): the official OpenAI client against it (chat, streaming with usage,
n, log-probabilities, structured output, models), bad input refused without touching anyone else's request,
OpenAI's error shapes, continuous batching under load, cancellation, API keys and live video sessions. One server
process for the module; the engine and sessions are tested in-process in test_engine.py."""

import base64
import concurrent.futures
import io
import json
import time
from pathlib import Path

import openai
import psutil
import pytest
import requests
import torch
from PIL import Image

from ivl.serve.launch import running_server

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(media / "red.png")
    args = ["--max-context", "2048", "--max-batch-size", "16", "--media-root", str(media), "--max-sessions", "2"]
    log = tmp_path_factory.mktemp("log")
    # started away from the repository, so that a demo model trained there (runs/demo/model) is not served
    with running_server(
        *args, log_path=log / "server.log", env={"IVL_API_KEY": KEY, "OMP_NUM_THREADS": "1"}, cwd=log
    ) as (url, proc):
        yield {"url": url, "media": media, "proc": proc}


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


def post(server, body, key=KEY, path="/v1/chat/completions"):
    return requests.post(server["url"] + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def png_url(size=(32, 32), color=(0, 128, 255)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(text, max_tokens=8, **extra):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0, **extra}


# ---- the OpenAI client ----------------------------------------------------------------------------------------


def test_openai_client_chats_streams_and_lists_models(server):
    c = client(server)
    assert [m.id for m in c.models.list()] == ["ivl-tiny-random"]
    assert c.models.retrieve("ivl-tiny-random").id == "ivl-tiny-random"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")
    reply = c.chat.completions.create(
        model="ivl-tiny-random", max_tokens=6, temperature=0, messages=[{"role": "user", "content": "Hello!"}]
    )
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    chunks = list(
        c.chat.completions.create(
            model="ivl-tiny-random",
            max_tokens=6,
            temperature=0,
            stream=True,
            messages=[{"role": "user", "content": "Hello!"}],
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length" and all(ch.usage is None for ch in chunks)
    # usage only when asked, as one more chunk with no choices
    chunks = list(
        c.chat.completions.create(
            model="m",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Hello!"}],
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_several_answers_log_probabilities_and_json_schema(server):
    c = client(server)
    reply = c.chat.completions.create(
        model="m",
        max_tokens=5,
        temperature=1.0,
        n=3,
        seed=11,
        logprobs=True,
        top_logprobs=2,
        messages=[{"role": "user", "content": "Hi"}],
    )
    assert [ch.index for ch in reply.choices] == [0, 1, 2] and reply.usage.completion_tokens == 15
    assert len({ch.message.content for ch in reply.choices}) > 1  # each answer draws its own tokens
    first = reply.choices[0].logprobs.content[0]
    assert first.logprob <= 0 and len(first.top_logprobs) == 2 and bytes(first.bytes).decode() == first.token
    schema = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green"]}},
        "required": ["color"],
        "additionalProperties": False,
    }
    reply = c.chat.completions.create(
        model="m",
        max_tokens=30,
        temperature=0,
        messages=[{"role": "user", "content": "Colour?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}},
    )
    assert json.loads(reply.choices[0].message.content)["color"] in ("red", "green")


def test_images_by_data_url_and_under_the_media_root(server):
    c = client(server)
    for url in (png_url(), f"file://{server['media'] / 'red.png'}"):
        reply = c.chat.completions.create(
            model="m",
            max_tokens=3,
            temperature=0,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "What colour?"},
                    ],
                }
            ],
        )
        assert reply.usage.prompt_tokens > 20 and reply.usage.completion_tokens == 3


def test_video_parts_are_frame_lists(server):
    r = post(
        server,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": [png_url(color=(i * 40, 0, 0)) for i in range(4)]},
                        {"type": "text", "text": "What happens?"},
                    ],
                }
            ],
            "max_tokens": 3,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_seeded_sampling_repeats_and_stop_strings_cut(server):
    c = client(server)
    kwargs = dict(model="m", max_tokens=12, temperature=1.0, messages=[{"role": "user", "content": "Tell me"}])
    one = c.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    assert c.chat.completions.create(seed=7, **kwargs).choices[0].message.content == one
    assert len({c.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in range(4)}) > 1
    greedy = c.chat.completions.create(
        model="m", max_tokens=12, temperature=0, messages=[{"role": "user", "content": "Tell me"}]
    ).choices[0]
    stop = greedy.message.content[3:5]
    cut = c.chat.completions.create(
        model="m", max_tokens=12, temperature=0, stop=[stop], messages=[{"role": "user", "content": "Tell me"}]
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == greedy.message.content[: greedy.message.content.find(stop)]


# ---- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, param, says",
    [
        ({"model": "m"}, 400, "messages", "`messages` must be a non-empty list"),
        (ask("hi", max_tokens=0), 400, "max_tokens", "`max_tokens` must be an integer from 1"),
        (ask("hi", max_tokens=10**6), 400, "max_tokens", "`max_tokens` must be an integer from 1"),
        (ask("hi", seed=2**70), 400, "seed", "`seed` must be an integer"),
        (ask("hi", top_logprobs=3), 400, "top_logprobs", "needs `logprobs: true`"),
        (ask("hi", n=99), 400, "n", "`n` must be an integer from 1"),
        (ask("hi", stream_options={"include_usage": True}), 400, "stream_options", "only allowed with `stream: true`"),
        (ask("hi", frequency_penalty=0.5), 400, "frequency_penalty", "`frequency_penalty` is not supported"),
        (ask("hi", tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "`tools` is not supported"),
        (ask("hi", response_format={"type": "xml"}), 400, "response_format.type", "json_object or json_schema"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            400,
            "messages[0].content[0].type",
            "got 'audio'",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}],
                    }
                ]
            },
            400,
            "messages[0].content[0]",
            "must hold an image",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}],
                    }
                ]
            },
            400,
            "messages[0].content[0]",
            "not valid base64",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url((5000, 4000))}}]}
                ]
            },
            413,
            "messages[0].content[0]",
            "pixels are accepted",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}
                ]
            },
            403,
            "messages[0].content[0]",
            "outside the media root",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}],
                    }
                ]
            },
            400,
            "messages[0].content[0]",
            "could not fetch",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url((448, 448))}}] * 8}
                ]
            },
            400,
            "messages",
            "over the model's context of 2,048",
        ),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "role must be one of"),
    ],
)
def test_bad_requests_get_openais_error_shape_naming_the_field(server, body, status, param, says):
    r = post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error" and (error["code"] is None or isinstance(error["code"], str))


def test_a_bad_request_fails_alone_and_never_a_batch(server):
    """Eight requests at once, one with a seed beyond int64: seven answers and one 400, streamed ones included."""
    bodies = [ask("Hello!", 6, seed=s) for s in range(7)] + [ask("Hello!", 6, seed=2**70)]
    bodies[3]["stream"] = True
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: post(server, b), bodies))
    assert [r.status_code for r in replies] == [200] * 7 + [400]
    assert replies[3].text.rstrip().endswith("data: [DONE]")


def test_malformed_json_form_bodies_unknown_routes_and_methods_get_openais_shape(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for data, kind in (
        (b"{not json", "application/json"),
        (b"messages=hi", "application/x-www-form-urlencoded"),
        (b"", "application/json"),
        (json.dumps(ask("hi")).encode(), "text/plain"),
    ):
        r = requests.post(server["url"] + "/v1/chat/completions", data=data, headers={**headers, "Content-Type": kind})
        assert r.status_code == 400 and "could not parse the JSON body" in r.json()["error"]["message"]
    r = requests.get(server["url"] + "/v1/completions", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.delete(server["url"] + "/v1/chat/completions", headers=headers)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert post(server, ask("still there?")).status_code == 200


def test_the_api_key_is_checked_in_constant_time_and_never_read_from_a_url(server):
    assert requests.get(server["url"] + "/health").status_code == 200
    assert requests.get(server["url"] + "/").status_code == 200  # the page holds no secret; it asks for the key
    assert requests.get(server["url"] + "/v1/models").status_code == 401
    assert requests.get(server["url"] + "/v1/models", params={"key": KEY}).status_code == 401
    assert post(server, ask("hi"), key="wrong").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    source = (Path(__file__).parents[1] / "ivl" / "serve" / "app.py").read_text()
    assert "hmac.compare_digest" in source


# ---- load --------------------------------------------------------------------------------------------------------


def test_concurrent_requests_get_what_they_get_alone(server):
    prompts = ["Hello!", "What is 2 + 2?", "Name a colour.", "Write a haiku about the sea, please."]
    alone = {p: post(server, ask(p, 10)).json()["choices"][0]["message"]["content"] for p in prompts}
    rss_before = psutil.Process(server["proc"].pid).memory_info().rss
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        same = list(pool.map(lambda _: post(server, ask(prompts[0], 10)).json(), range(16)))
        mixed = list(pool.map(lambda p: (p, post(server, ask(p, 10)).json()), prompts * 4))
    assert all(r["choices"][0]["message"]["content"] == alone[prompts[0]] for r in same)
    assert all(r["choices"][0]["message"]["content"] == alone[p] for p, r in mixed)
    assert psutil.Process(server["proc"].pid).memory_info().rss - rss_before < 64 * 2**20  # a fixed slot pool


def test_a_client_leaving_mid_stream_frees_its_slot(tmp_path):
    """One slot: a request queued behind an abandoned 2,000-token stream waits for all of it unless the stream's
    slot is freed when its client leaves."""
    with running_server(
        "--max-batch-size",
        "1",
        "--max-tokens",
        "2000",
        log_path=tmp_path / "server.log",
        env={"OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    ) as (url, _):
        start = time.time()
        requests.post(url + "/v1/chat/completions", json=ask("Go on", 200), timeout=120).raise_for_status()
        per_token = (time.time() - start) / 200
        with requests.post(
            url + "/v1/chat/completions", json=ask("Go on and on", 2000, stream=True), stream=True, timeout=60
        ) as r:
            lines = r.iter_lines()
            next(lines)
            next(lines)
        start = time.time()
        assert requests.post(url + "/v1/chat/completions", json=ask("and me?", 4), timeout=120).status_code == 200
        assert time.time() - start < 500 * per_token  # not behind the 2,000 tokens


# ---- video sessions over HTTP ----------------------------------------------------------------------------------


def test_video_session_open_push_ask_close_and_its_limits(server):
    s = post(server, {"op": "open"}, path="/v1/sessions").json()["session"]
    frames = [png_url((56, 56), (i * 20, 0, 0)) for i in range(5)]
    pushed = post(server, {"op": "push", "session": s, "frames": frames}, path="/v1/sessions").json()
    assert pushed["frames"] == 5
    answer = post(
        server, {"op": "ask", "session": s, "question": "What changes?", "max_tokens": 4}, path="/v1/sessions"
    ).json()
    assert answer["frames"] == 5 and answer["completion_tokens"] <= 4 and isinstance(answer["answer"], str)
    # a question leaves the stream where it was: the same question again gets the same greedy answer
    again = post(
        server,
        {"op": "ask", "session": s, "question": "What changes?", "max_tokens": 4, "temperature": 0},
        path="/v1/sessions",
    ).json()
    first = post(
        server,
        {"op": "ask", "session": s, "question": "What changes?", "max_tokens": 4, "temperature": 0},
        path="/v1/sessions",
    ).json()
    assert again["answer"] == first["answer"]
    # refused calls change nothing: a frame of another size than the one waiting for its pair, a huge seed
    wrong = post(server, {"op": "push", "session": s, "frames": [png_url((84, 84))]}, path="/v1/sessions")
    assert wrong.status_code == 400 and "one size" in wrong.json()["error"]["message"]
    huge = post(server, {"op": "ask", "session": s, "question": "?", "seed": 2**64}, path="/v1/sessions")
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "seed"
    assert (
        post(
            server,
            {"op": "ask", "session": s, "question": "What changes?", "max_tokens": 4, "temperature": 0},
            path="/v1/sessions",
        ).json()
        == first
    )
    others = [post(server, {"op": "open"}, path="/v1/sessions") for _ in range(2)]
    assert others[0].status_code == 200 and others[1].status_code == 429
    assert "sessions are open" in others[1].json()["error"]["message"]
    assert post(server, {"op": "close", "session": s}, path="/v1/sessions").json()["closed"]
    gone = post(server, {"op": "ask", "session": s, "question": "?"}, path="/v1/sessions")
    assert gone.status_code == 404 and "no open session" in gone.json()["error"]["message"]
    post(server, {"op": "close", "session": others[0].json()["session"]}, path="/v1/sessions")


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", "application/json"),
        (b"{oops", "application/json"),
        (b"op=open", "application/x-www-form-urlencoded"),
        (b'["open"]', "application/json"),
        (b'{"op": "fly"}', "application/json"),
        (b'{"op": "open", "extra": 1}', "application/json"),
    ],
)
def test_malformed_session_calls_are_4xx(server, data, kind):
    r = requests.post(
        server["url"] + "/v1/sessions", data=data, headers={"Authorization": f"Bearer {KEY}", "Content-Type": kind}
    )
    assert r.status_code == 400 and r.json()["error"]["message"], r.text


# ---- the baseline: Qwen2.5-VL converted exactly, on the same engine ----------------------------------------------


def test_the_baseline_serves_the_teachers_own_greedy_answers(tmp_path):
    """--baseline: a transformers Qwen2.5-VL folder, every layer full attention, on the same engine: its answers are
    the teacher's own greedy generate."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ivl.data.processing import Processor
    from ivl.serve.engine import ChatEngine, Prompt, Sampling
    from ivl.serve.loading import load_baseline
    from ivl.teachers.qwen2_5_vl import TINY_TEACHER

    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**TINY_TEACHER))
    teacher.save_pretrained(tmp_path / "teacher")
    Processor.from_pretrained().save_pretrained(tmp_path / "teacher")
    model, processor, name = load_baseline(tmp_path / "teacher", dtype="float32")
    assert set(model.lm.config.layer_types) == {"attention"} and model.lm.config.window is None
    chat = ChatEngine(model, processor, capacity=2, max_context=256)
    texts = [
        processor.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
        for c in ("hello", "a longer question for the other row")
    ]
    out = ["", ""]
    for step in chat.generate([Prompt(t, sampling=Sampling(max_tokens=n)) for t, n in zip(texts, (4, 7))]):
        for i, delta in enumerate(step):
            if delta is not None:
                out[i] += delta.text
    for text, n, got in zip(texts, (4, 7), out):
        inputs = processor(text)
        alone = teacher.generate(**inputs, max_new_tokens=n, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        assert processor.decode(alone, skip_special_tokens=True) == got


def test_sigterm_ends_the_server_quietly(tmp_path):
    """``kill`` (SIGTERM), as a service manager stops it: exit code 0, nothing logged as an error."""
    log = tmp_path / "server.log"
    with running_server(log_path=log, env={"OMP_NUM_THREADS": "1"}, cwd=tmp_path) as (url, proc):
        proc.terminate()
        assert proc.wait(30) == 0
    text = log.read_text()
    assert "serving ivl-tiny-random (no --model and no runs/demo/model here" in text.splitlines()[0]
    assert "ERROR" not in text and "Traceback" not in text, text


def test_the_startup_line_names_the_folder_served(tmp_path, monkeypatch):
    from ivl.serve.cli import parse_args, served_model

    (tmp_path / "runs" / "demo" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "model" / "config.json").write_text("{}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert served_model(parse_args(["--model", "mine"])) == str(tmp_path / "mine")
    assert served_model(parse_args([])).startswith(f"{tmp_path / 'runs' / 'demo' / 'model'} (the demo's trained")
