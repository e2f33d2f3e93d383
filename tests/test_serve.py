"""The server on the tiny random model (CPU): the official OpenAI client against it, bad input, batching under
load, cancellation, API keys and live video sessions. One server process for the module (it takes ~20 s to
start); engine- and session-level behaviour is tested in-process."""

import base64
import concurrent.futures
import io
import time

import numpy as np
import openai
import psutil
import pytest
import requests
import torch
from PIL import Image

from ivl.data.processing import Processor
from ivl.serve.engine import Engine, KeptDecoders, Prompt, Sampling
from ivl.serve.loading import tiny_random_model
from ivl.serve.sessions import SessionError, SessionStore, VideoSession
from ivl.serve.launch import running_server

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(media / "red.png")
    args = ["--max-context", "2048", "--max-batch-size", "16", "--media-root", str(media), "--max-sessions", "2"]
    log = tmp_path_factory.mktemp("log")
    # started away from the repository, so that a demo model trained there (runs/demo/model) is not served
    with running_server(*args, log_path=log / "server.log", env={"IVL_API_KEY": KEY, "OMP_NUM_THREADS": "1"},
                        cwd=log) as (url, proc):
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
    reply = c.chat.completions.create(model="ivl-tiny-random", max_tokens=6, temperature=0,
                                      messages=[{"role": "user", "content": "Hello!"}])
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    stream = c.chat.completions.create(model="ivl-tiny-random", max_tokens=6, temperature=0, stream=True,
                                       messages=[{"role": "user", "content": "Hello!"}])
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_images_by_data_url_and_under_the_media_root(server):
    c = client(server)
    for url in (png_url(), f"file://{server['media'] / 'red.png'}"):
        reply = c.chat.completions.create(model="m", max_tokens=3, temperature=0, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour?"}]}])
        assert reply.usage.prompt_tokens > 20 and reply.usage.completion_tokens == 3


def test_video_parts_are_frame_lists(server):
    r = post(server, {"messages": [{"role": "user", "content": [
        {"type": "video", "video": [png_url(color=(i * 40, 0, 0)) for i in range(4)]},
        {"type": "text", "text": "What happens?"}]}], "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_seeded_sampling_repeats_and_stop_strings_cut(server):
    c = client(server)
    kwargs = dict(model="m", max_tokens=12, temperature=1.0, messages=[{"role": "user", "content": "Tell me"}])
    one = c.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    assert c.chat.completions.create(seed=7, **kwargs).choices[0].message.content == one
    assert len({c.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in range(4)}) > 1
    greedy = c.chat.completions.create(model="m", max_tokens=12, temperature=0,
                                       messages=[{"role": "user", "content": "Tell me"}]).choices[0]
    stop = greedy.message.content[3:5]
    cut = c.chat.completions.create(model="m", max_tokens=12, temperature=0, stop=[stop],
                                    messages=[{"role": "user", "content": "Tell me"}]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == greedy.message.content[: greedy.message.content.find(stop)]


# ---- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, says", [
    ({"model": "m"}, 400, "`messages` must be a non-empty list"),
    (ask("hi", max_tokens=0), 400, "max_tokens must be an integer from 1"),
    (ask("hi", max_tokens=10**6), 400, "max_tokens must be an integer from 1"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "got 'audio'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:text/plain;base64,aGk="}}]}]}, 400, "must hold an image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,!!!"}}]}]}, 400, "not valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": png_url((5000, 4000))}}]}]}, 413, "pixels are accepted"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     403, "outside the media root"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://127.0.0.1:9/x.png"}}]}]}, 400, "could not fetch"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url((448, 448))}}] * 8
                    }]}, 400, "over the model's context of 2,048"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be one of"),
])
def test_bad_requests_get_a_4xx_that_says_what_to_fix(server, body, status, says):
    r = post(server, body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]


def test_malformed_json_and_the_server_keeps_serving(server):
    r = requests.post(server["url"] + "/v1/chat/completions", data=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert post(server, ask("still there?")).status_code == 200


def test_api_key_guards_everything_but_health(server):
    assert requests.get(server["url"] + "/health").status_code == 200
    for path in ("/v1/models", "/"):
        assert requests.get(server["url"] + path).status_code == 401
    assert post(server, ask("hi"), key="wrong").status_code == 401
    assert requests.get(server["url"] + "/", params={"key": KEY}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()


# ---- load --------------------------------------------------------------------------------------------------------

def _worker_rss(server) -> int:
    procs = [psutil.Process(server["proc"].pid), *psutil.Process(server["proc"].pid).children(recursive=True)]
    return sum(p.memory_info().rss for p in procs)


def test_concurrent_requests_get_what_they_get_alone(server):
    prompts = ["Hello!", "What is 2 + 2?", "Name a colour.", "Write a haiku about the sea, please."]
    alone = {p: post(server, ask(p, 10)).json()["choices"][0]["message"]["content"] for p in prompts}
    rss_before = _worker_rss(server)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        same = list(pool.map(lambda _: post(server, ask(prompts[0], 10)).json(), range(16)))
        mixed = list(pool.map(lambda p: (p, post(server, ask(p, 10)).json()), prompts * 4))
    assert all(r["choices"][0]["message"]["content"] == alone[prompts[0]] for r in same)
    assert all(r["choices"][0]["message"]["content"] == alone[p] for p, r in mixed)
    assert _worker_rss(server) - rss_before < 64 * 2**20  # back near where it was (allocator slack aside)


def test_a_client_leaving_mid_stream_frees_its_row(server):
    """Batches run one after another, so a request queued behind an abandoned 1,000-token stream waits for all of
    it unless the stream's row is dropped when its client leaves."""
    start = time.time()
    assert post(server, ask("Go on and on", 1000)).json()["usage"]["completion_tokens"] == 1000
    full = time.time() - start
    with requests.post(server["url"] + "/v1/chat/completions", json=ask("Go on and on", 1000, stream=True),
                       stream=True, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
    start = time.time()
    assert post(server, ask("and me?", 4)).status_code == 200
    assert time.time() - start < full / 2


# ---- video sessions over HTTP ----------------------------------------------------------------------------------

def test_video_session_open_push_ask_close_and_its_limits(server):
    s = post(server, {"op": "open"}, path="/v1/sessions").json()["session"]
    frames = [png_url((56, 56), (i * 20, 0, 0)) for i in range(6)]
    pushed = post(server, {"op": "push", "session": s, "frames": frames}, path="/v1/sessions").json()
    assert pushed["frames"] == 6
    answer = post(server, {"op": "ask", "session": s, "question": "What changes?", "max_tokens": 4},
                  path="/v1/sessions").json()
    assert answer["frames"] == 6 and answer["completion_tokens"] <= 4 and isinstance(answer["answer"], str)
    # a question leaves the stream where it was: the same question again gets the same greedy answer
    again = post(server, {"op": "ask", "session": s, "question": "What changes?", "max_tokens": 4, "temperature": 0},
                 path="/v1/sessions").json()
    first = post(server, {"op": "ask", "session": s, "question": "What changes?", "max_tokens": 4, "temperature": 0},
                 path="/v1/sessions").json()
    assert again["answer"] == first["answer"]
    others = [post(server, {"op": "open"}, path="/v1/sessions") for _ in range(2)]
    assert others[0].status_code == 200 and others[1].status_code == 429
    assert "sessions are open" in others[1].json()["error"]["message"]
    assert post(server, {"op": "close", "session": s}, path="/v1/sessions").json()["closed"]
    gone = post(server, {"op": "ask", "session": s, "question": "?"}, path="/v1/sessions")
    assert gone.status_code == 404 and "no open session" in gone.json()["error"]["message"]
    post(server, {"op": "close", "session": others[0].json()["session"]}, path="/v1/sessions")


# ---- in-process: the engine and the sessions ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(), Processor.from_pretrained()


def test_engine_batch_equals_one_by_one_and_drops_finished_rows(tiny):
    model, processor = tiny
    engine = Engine(model, processor)
    texts = [processor.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
             for c in ("hi", "a much longer question that pads the other row", "third")]
    budgets = [3, 9, 6]
    prompts = [Prompt(t, sampling=Sampling(max_tokens=n)) for t, n in zip(texts, budgets)]
    live_per_step, out = [], ["", "", ""]
    for step in engine.generate(prompts):
        live_per_step.append(sum(d is not None for d in step))
        for i, d in enumerate(step):
            if d is not None:
                out[i] += d.text
    assert live_per_step == [3, 3, 3, 2, 2, 2, 1, 1, 1]
    for text, n, got in zip(texts, budgets, out):
        reference = model.generate(**processor(text), max_new_tokens=n)  # model.generate: the independent path
        assert processor.decode(reference[0]) == got


def test_kept_static_decoders_decode_what_the_dynamic_cache_does_batch_after_batch(tiny):
    """The GPU's decoding scheme (fixed-shape decoders per power-of-two batch size, kept between batches, finished
    rows left in as placeholders), run uncaptured on the CPU: each batch gets the dynamic path's text, and a batch
    served by a decoder that served another batch before gets what a fresh engine gives it."""
    import copy

    _, processor = tiny
    # The mixers' outputs scaled up so that the context, not the current token, picks each greedy token: a wrong
    # position, token index or cache row then changes the text.
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        for block in model.lm.layers:
            block.mixer.o_proj.weight.mul_(30)

    def run(engine, contents, budgets):
        texts = [processor.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
                 for c in contents]
        out = [""] * len(texts)
        for step in engine.generate([Prompt(t, sampling=Sampling(max_tokens=n)) for t, n in zip(texts, budgets)]):
            for i, d in enumerate(step):
                if d is not None:
                    out[i] += d.text
        return out

    first = (["hi", "a much longer question that pads the other row", "third"], [3, 9, 6])
    second = (["what is this?", "one more", "and a third one, longer than both"], [7, 2, 5])
    kept = Engine(model, processor, decoder="static")
    assert run(kept, *first) == run(Engine(model, processor, decoder="dynamic"), *first)
    assert run(kept, *second) == run(Engine(model, processor, decoder="static"), *second)
    assert run(kept, ["alone"], [4]) == run(Engine(model, processor, decoder="dynamic"), ["alone"], [4])
    assert sorted(kept.decoders.by_size) == [1, 4]  # 3 rows ran on the decoder of 4, built once


def test_cancelled_rows_leave_the_batch_at_once(tiny):
    model, processor = tiny
    engine = Engine(model, processor)
    text = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    gone = set()
    steps = []
    for step in engine.generate([Prompt(text, sampling=Sampling(max_tokens=50))] * 2, cancelled=lambda i: i in gone):
        steps.append(step)
        if len(steps) == 2:
            gone.add(0)
    assert steps[2][0].finish_reason == "cancelled" and steps[3][0] is None and steps[3][1] is not None
    assert len(steps) == 50


def test_video_session_memory_stays_flat_over_10000_frames(tiny):
    model, processor = tiny
    small = Processor(processor.tokenizer, video_min_pixels=56 * 56, video_max_pixels=56 * 56)
    session = VideoSession(model, small, fps=2.0)
    frames = [np.full((56, 56, 3), i, np.uint8) for i in range(50)]
    process = psutil.Process()
    sizes, rss = [], []
    for push in range(200):  # 10,000 frames
        session.push(frames)
        if push % 20 == 19:
            sizes.append(session.nbytes())
            rss.append(process.memory_info().rss)
    assert session.frames == 10_000 and len(set(sizes)) == 1
    assert max(rss[1:]) - rss[1] < 8 * 2**20  # flat after warm-up
    answer = session.ask("What did you see?", Sampling(max_tokens=3))
    assert answer["frames"] == 10_000 and answer["completion_tokens"] <= 3


def test_session_answers_on_a_kept_decoder_equal_the_dynamic_cache_and_the_stream_goes_on(tiny):
    """The GPU's session answers (a kept fixed-shape decoder, shared by the sessions; uncaptured on the CPU) decode
    the logits the dynamic cache gives, ask after ask, and asking leaves the stream where it was."""
    model, processor = tiny
    small = Processor(processor.tokenizer, video_min_pixels=56 * 56, video_max_pixels=56 * 56)
    kept = KeptDecoders(model.lm, cuda_graph=False)
    sessions = [VideoSession(model, small, fps=2.0, decoders=kept), VideoSession(model, small, fps=2.0)]

    def logits_after(session, tokens):
        stream, session.cache = session.cache, session.cache.clone()
        step = session._decode_step(session.max_position + 1)
        out = torch.stack([step(t) for t in tokens])
        session.cache = stream
        return out

    for push in range(3):
        frames = [np.full((56, 56, 3), 40 * push + i, np.uint8) for i in range(6)]
        for session in sessions:
            session.push(frames)
        torch.testing.assert_close(*(logits_after(s, [5, 17, 99, 3]) for s in sessions), rtol=1e-5, atol=1e-5)
        answers = [s.ask("What did you see?", Sampling(max_tokens=4)) for s in sessions]
        assert answers[0] == answers[1]
    assert list(kept.by_size) == [1]


def test_session_store_limits_and_expiry(tiny):
    model, processor = tiny
    store = SessionStore(model, processor, max_sessions=1, idle_timeout=60)
    sid = store.open()
    with pytest.raises(SessionError, match="sessions are open"):
        store.open()
    store.sessions[sid].last_used -= 61  # a minute idle (not slept: a loaded machine must not change the result)
    other = store.open()  # the idle one expired
    with pytest.raises(SessionError, match="no open session"):
        store.get(sid)
    store.close(other)


def test_transformers_baseline_engine_streams_what_generate_returns(tmp_path):
    """The serving benchmark's reference: transformers' Qwen2.5-VL behind Engine's interface, batched, against
    its own generate on each prompt alone."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ivl.model.teachers import TINY_TEACHER
    from ivl.serve.baseline import TransformersEngine

    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**TINY_TEACHER))
    teacher.save_pretrained(tmp_path / "teacher")
    Processor.from_pretrained().save_pretrained(tmp_path / "teacher")
    engine = TransformersEngine.from_pretrained(str(tmp_path / "teacher"), dtype="float32")
    processor = engine.processor
    texts = [processor.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
             for c in ("hello", "a longer question for the other row")]
    out = ["", ""]
    for step in engine.generate([Prompt(t, sampling=Sampling(max_tokens=n)) for t, n in zip(texts, (4, 7))]):
        for i, delta in enumerate(step):
            if delta is not None:
                out[i] += delta.text
    for text, n, got in zip(texts, (4, 7), out):
        inputs = processor(text)
        alone = engine.model.generate(**inputs, max_new_tokens=n, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert processor.decode(alone) == got


def test_a_stopped_server_leaves_no_model_worker_behind(tmp_path):
    """LitServe runs the model in spawned worker processes, which outlive a terminated server process; the
    launcher (tests, ``python -m ivl.bench serve``) ends the server's whole process group."""
    with running_server(log_path=tmp_path / "server.log", env={"OMP_NUM_THREADS": "1"}) as (url, proc):
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_sigterm_ends_the_server_and_its_model_workers_quietly(tmp_path):
    """``kill`` (SIGTERM) of the server alone, as a service manager stops it: the workers end with it, the exit
    code is 0 and nothing is logged as an error."""
    log = tmp_path / "server.log"
    with running_server(log_path=log, env={"OMP_NUM_THREADS": "1"}, cwd=tmp_path) as (url, proc):
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers
        proc.terminate()
        assert proc.wait(30) == 0
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, [p.cmdline() for p in alive]
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
