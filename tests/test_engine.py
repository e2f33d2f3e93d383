"""The decode engine (ivl.model.decoding.generation) and the chat layer on it (ivl.serve.engine), in-process on the tiny
model: one path for generate(), chat requests and live sessions; continuous batching (joining mid-batch, chunked
prefill between decode steps, cancelling, several copies); log-probabilities; structured output; sessions."""

import copy
import json

import numpy as np
import psutil
import pytest
import torch

from ivl.data.processing import Processor
from ivl.model.decoding.generation import Sampling
from ivl.serve.engine import ChatEngine, Prompt
from ivl.serve.loading import tiny_random_model
from ivl.serve.sessions import PREFIX, SessionError, SessionStore, VideoSession


@pytest.fixture(scope="module")
def tiny():
    """The tiny random model with its mixers' outputs scaled up, so that the context, not only the current token,
    picks each greedy token: a wrong position, token index or cache row then changes the text."""
    model = tiny_random_model()
    with torch.no_grad():
        for block in model.lm.layers:
            block.mixer.o_proj.weight.mul_(30)
    return model, Processor.from_pretrained()


def chat_text(processor, content: str) -> str:
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def reference(model, processor, text: str, n: int, **media) -> str:
    """Greedy tokens by full forwards of the growing sequence, no cache at all: the independent reference."""
    inputs = processor(text, **media)
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(ids, **inputs).logits[0, -1].argmax())
            if token in model.config.eos_token_ids:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return processor.decode(out)


def run(chat: ChatEngine, prompts: list[Prompt]) -> list[str]:
    out = [""] * len(prompts)
    for step in chat.generate(prompts):
        for i, delta in enumerate(step):
            if delta is not None:
                out[i] += delta.text
    return out


def test_generate_chat_and_a_live_session_are_one_path_and_give_the_full_forward_tokens(tiny):
    """The same input three ways (InfiniteVL.generate, a chat prompt, a session's question after its pushed frames)
    gives the same greedy tokens, and those of full forwards without a cache."""
    model, processor = tiny
    small = Processor(processor.tokenizer, video_min_pixels=56 * 56, video_max_pixels=56 * 56)
    frames = [np.full((56, 56, 3), 30 * i, np.uint8) for i in range(4)]
    text = PREFIX + "<|video_pad|><|vision_end|>What moves?<|im_end|>\n<|im_start|>assistant\n"
    expected = reference(model, small, text, 8, videos=[np.stack(frames)])
    generated = model.generate(**small(text, videos=[np.stack(frames)]), max_new_tokens=8)
    assert small.decode(generated[0]) == expected
    chat = ChatEngine(model, small, capacity=2)
    assert run(chat, [Prompt(text, videos=[np.stack(frames)], sampling=Sampling(max_tokens=8))]) == [expected]
    with serving(chat):
        session = VideoSession(chat, fps=2.0)
        session.push(frames[:3]).result(60)  # one frame waits for its pair: pushes need not come in pairs
        session.push(frames[3:]).result(60)
        assert session.ask("What moves?", Sampling(max_tokens=8)).result(60)["answer"] == expected


class serving:
    """The engine on its own thread while the block runs (as the server runs it)."""

    def __init__(self, chat):
        import threading

        self.chat, self.thread = chat, threading.Thread(target=chat.engine.run, daemon=True)

    def __enter__(self):
        self.thread.start()

    def __exit__(self, *exc):
        self.chat.engine.stop()
        self.thread.join(10)


def test_a_request_joining_a_running_batch_gets_what_it_gets_alone(tiny):
    model, processor = tiny
    chat = ChatEngine(model, processor, capacity=4)
    texts = [chat_text(processor, c) for c in ("hi", "a much longer question that runs on", "third one")]
    alone = [reference(model, processor, t, 9) for t in texts]
    got = [""] * 3

    def collect(i):
        return lambda delta: got.__setitem__(i, got[i] + delta.text)

    chat.start(Prompt(texts[0], sampling=Sampling(max_tokens=9)), collect(0))
    for _ in range(4):  # the first request decodes on its own for a few steps
        chat.engine.step()
    chat.start(Prompt(texts[1], sampling=Sampling(max_tokens=9)), collect(1))
    chat.engine.step()
    chat.start(Prompt(texts[2], sampling=Sampling(max_tokens=9)), collect(2))
    while chat.engine.busy():
        chat.engine.step()
    assert got == alone


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny):
    """With a budget of 16 prompt tokens per step, a running request gets a token every step while a long prompt
    is prefilled, and the long prompt's answer is its answer alone."""
    model, processor = tiny
    chat = ChatEngine(model, processor, capacity=2, step_budget=16)
    short, long = chat_text(processor, "hi"), chat_text(processor, "tell me " * 30)
    tokens = []
    chat.start(Prompt(short, sampling=Sampling(max_tokens=30)), lambda d: tokens.append(d.completion_tokens))
    chat.engine.step()
    answer = []
    chat.start(Prompt(long, sampling=Sampling(max_tokens=5)), lambda d: answer.append(d.text))
    steps_before = len(tokens)
    while not answer:  # the long prompt is being prefilled
        chat.engine.step()
    chunks = len(tokens) - steps_before
    assert chunks >= len(processor.tokenizer(long)["input_ids"]) // 16 - 1  # one decode step per chunk
    assert tokens == list(range(1, len(tokens) + 1))  # the running request got one token per step throughout
    while chat.engine.busy():
        chat.engine.step()
    assert "".join(answer) == reference(model, processor, long, 5)


def test_prompts_that_start_together_share_one_vision_call_and_answer_as_alone(tiny, monkeypatch):
    """Images of different sizes, a video and a text-only prompt admitted at one step: one vision-tower call for all
    of them, and each answer is the full-forward answer of its prompt alone. A prompt whose own media is broken
    ends with an error and the others still answer."""
    model, processor = tiny
    rng = np.random.default_rng(0)
    image = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    small = Processor(processor.tokenizer, video_min_pixels=56 * 56, video_max_pixels=56 * 56)
    video = np.stack([image(56, 56) for _ in range(4)])
    prompts = [
        (chat_text(small, [{"type": "image"}, {"type": "text", "text": "what is it?"}]), {"images": [image(56, 84)]}),
        (chat_text(small, "only text here"), {}),
        (chat_text(small, [{"type": "video"}, {"type": "text", "text": "what moves?"}]), {"videos": [video]}),
        (
            chat_text(small, [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same?"}]),
            {"images": [image(112, 56), image(56, 56)]},
        ),
    ]
    alone = [reference(model, small, text, 6, **media) for text, media in prompts]
    calls = []
    tower = model.visual.forward
    monkeypatch.setattr(model.visual, "forward", lambda *a, **k: calls.append(1) or tower(*a, **k))
    chat = ChatEngine(model, small, capacity=4)
    got = run(chat, [Prompt(text, sampling=Sampling(max_tokens=6), **media) for text, media in prompts])
    assert got == alone and len(calls) == 2  # the images and the video: one call each, for all four prompts

    broken = chat.sequence(Prompt(*prompts[0][:1], sampling=Sampling(max_tokens=6), **prompts[0][1]), lambda d: None)
    broken.media["image_grid_thw"] = broken.media["image_grid_thw"] * 2  # more patches than its pixels
    answers, finishes = [""] * 2, []

    def collect(i):
        return lambda delta: answers.__setitem__(i, answers[i] + delta.text)

    first = chat.sequence(Prompt(prompts[3][0], sampling=Sampling(max_tokens=6), **prompts[3][1]), collect(0))
    last = chat.sequence(Prompt(prompts[1][0], sampling=Sampling(max_tokens=6)), collect(1))
    broken.on_token = lambda token: finishes.append(token.finish)
    chat.engine.run_until_done([first, broken, last])
    assert finishes == ["error"] and answers == [alone[3], alone[1]]


def test_a_cancelled_request_leaves_its_slot_at_the_next_step(tiny):
    model, processor = tiny
    chat = ChatEngine(model, processor, capacity=1)  # one slot: the second request waits for it
    text = chat_text(processor, "hi")
    first, second = [], []
    running = chat.start(Prompt(text, sampling=Sampling(max_tokens=200)), first.append)
    chat.start(Prompt(text, sampling=Sampling(max_tokens=3)), second.append)
    for _ in range(3):
        chat.engine.step()
    assert not second
    chat.cancel(running)
    steps = 0
    while chat.engine.busy():
        chat.engine.step()
        steps += 1
    assert first[-1].finish_reason == "cancelled" and len(first) <= 4
    assert steps <= 4 and second[-1].finish_reason == "length"


def test_copies_sample_with_their_own_seeds_and_greedy_copies_agree(tiny):
    model, processor = tiny
    chat = ChatEngine(model, processor, capacity=4)
    text = chat_text(processor, "hi")
    texts = [""] * 3

    def collect(delta):
        texts[delta.index] += delta.text

    chat.engine.run_until_done(
        [chat.sequence(Prompt(text, sampling=Sampling(max_tokens=6, temperature=1.5, seed=3), n=3), collect)]
    )
    again = [""] * 3
    chat.engine.run_until_done(
        [
            chat.sequence(
                Prompt(text, sampling=Sampling(max_tokens=6, temperature=1.5, seed=3), n=3),
                lambda d: again.__setitem__(d.index, again[d.index] + d.text),
            )
        ]
    )
    assert texts == again and len(set(texts)) == 3
    greedy = [""] * 2
    chat.engine.run_until_done(
        [
            chat.sequence(
                Prompt(text, sampling=Sampling(max_tokens=6), n=2),
                lambda d: greedy.__setitem__(d.index, greedy[d.index] + d.text),
            )
        ]
    )
    assert greedy[0] == greedy[1] == reference(model, processor, text, 6)


def test_log_probabilities_are_those_of_the_model_distribution(tiny):
    model, processor = tiny
    text = chat_text(processor, "hi")
    tokens = []
    chat = ChatEngine(model, processor, capacity=1)
    chat.engine.run_until_done(
        [chat.sequence(Prompt(text, sampling=Sampling(max_tokens=3, logprobs=2)), tokens.append)]
    )
    ids = processor(text)["input_ids"]
    for delta in tokens[:2]:
        [entry] = delta.logprobs
        with torch.no_grad():
            expected = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        chosen = int(expected.argmax())
        assert entry["token"] == processor.decode([chosen])
        assert entry["logprob"] == pytest.approx(float(expected[chosen]), abs=1e-4)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(
            expected.topk(2).values.tolist(), abs=1e-4
        )
        ids = torch.cat([ids, torch.tensor([[chosen]])], dim=1)


def test_json_schema_output_is_valid_and_follows_the_schema(tiny):
    from ivl.serve.structured import FormatError, constraint_for

    model, processor = tiny
    schema = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["color", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    constraint = constraint_for(fmt, processor.tokenizer, model.lm.config.vocab_size)
    chat = ChatEngine(model, processor, capacity=2)
    text = chat_text(processor, "Colour and number?")
    [out] = run(chat, [Prompt(text, sampling=Sampling(max_tokens=40), constraint=constraint)])
    value = json.loads(out)  # a random model, held to the schema: valid, complete JSON
    assert set(value) == {"color", "n"} and value["color"] in ("red", "green") and 0 <= value["n"] <= 99
    with pytest.raises(FormatError, match="json_schema.schema is not a schema"):
        constraint_for(
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
            processor.tokenizer,
            model.lm.config.vocab_size,
        )


def test_generate_decodes_many_rows_through_few_slots(tiny):
    """InfiniteVL.generate of a batch: rows that stop early leave, the others keep decoding, tokens are exact."""
    model, processor = tiny
    texts = [chat_text(processor, c) for c in ("hi", "a longer one", "third")]
    batch = processor(texts)
    tokens = model.generate(**batch, max_new_tokens=7, stop_token_ids=[])
    for row, text in enumerate(texts):
        inputs = processor(text)
        alone = model.generate(**inputs, max_new_tokens=7, stop_token_ids=[])
        assert torch.equal(tokens[row], alone[0])


# ---- live sessions -----------------------------------------------------------------------------------------------


@pytest.fixture
def sessions(tiny):
    model, processor = tiny
    small = Processor(processor.tokenizer, video_min_pixels=56 * 56, video_max_pixels=56 * 56)
    chat = ChatEngine(model, small, capacity=2)
    with serving(chat):
        yield chat


def test_session_memory_stays_flat_over_10000_frames(sessions):
    session = VideoSession(sessions, fps=2.0)
    frames = [np.full((56, 56, 3), i, np.uint8) for i in range(50)]
    process = psutil.Process()
    sizes, rss = [], []
    for push in range(200):  # 10,000 frames
        session.push(frames).result(60)
        if push % 20 == 19:
            sizes.append(session.nbytes())
            rss.append(process.memory_info().rss)
    assert session.frames == 10_000 and len(set(sizes)) == 1
    assert max(rss[1:]) - rss[1] < 8 * 2**20  # flat after warm-up
    answer = session.ask("What did you see?", Sampling(max_tokens=3)).result(60)
    assert answer["frames"] == 10_000 and answer["completion_tokens"] <= 3


def test_a_question_leaves_the_stream_where_it_was_and_a_bad_push_changes_nothing(sessions):
    session = VideoSession(sessions, fps=2.0)
    session.push([np.full((56, 56, 3), 9, np.uint8)] * 3).result(60)  # one frame waits for its pair
    ask = lambda: session.ask("What did you see?", Sampling(max_tokens=5)).result(60)  # noqa: E731
    first = ask()
    assert ask() == first  # the first question did not advance the stream
    state = copy.deepcopy((session.frames, session.patches, session.max_position, len(session.pending)))
    cache = [t.clone() for layer in session.cache.layers for t in layer.tensors()]
    with pytest.raises(SessionError, match="must all have one size.*waits for its pair"):
        session.push([np.full((84, 84, 3), 1, np.uint8)] * 2)
    assert (session.frames, session.patches, session.max_position, len(session.pending)) == state
    assert all(torch.equal(a, b) for a, b in zip(cache, (t for layer in session.cache.layers for t in layer.tensors())))
    assert ask() == first


def test_session_store_limits_and_expiry(sessions):
    store = SessionStore(sessions, max_sessions=1, idle_timeout=60)
    sid = store.open()
    with pytest.raises(SessionError, match="sessions are open"):
        store.open()
    store.sessions[sid].last_used -= 61  # a minute idle (not slept: a loaded machine must not change the result)
    other = store.open()  # the idle one expired
    with pytest.raises(SessionError, match="no open session"):
        store.get(sid)
    store.close(other)


def test_streamed_text_is_the_whole_answer_decoded_at_once():
    """Token by token, with multi-byte characters split across tokens, random ids and a stop string held back:
    the pieces add up to the tokenizer's decode of the whole answer (the reference), cut at the stop string."""
    from ivl.model.decoding.generation import Token
    from ivl.serve.engine import _Text

    processor = Processor.from_pretrained()
    rng = np.random.default_rng(0)
    answers = [
        processor.tokenizer.encode("Grüße, 世界! 🎉🦙 naïve café — done."),
        rng.integers(0, 151000, 200).tolist(),
    ]
    for ids in answers:
        text = _Text(processor, Sampling())
        pieces = [text.take(Token(0, t, finish=None if i < len(ids) - 1 else "length"))[0] for i, t in enumerate(ids)]
        assert "".join(pieces) == processor.decode(ids, skip_special_tokens=True)
    ids = processor.tokenizer.encode("one two three STOP four")
    text = _Text(processor, Sampling(stop=["STOP"]))
    pieces = []
    for t in ids:
        piece, finish = text.take(Token(0, t))
        pieces.append(piece)
        if finish:
            break
    assert "".join(pieces) == "one two three " and finish == "stop"
