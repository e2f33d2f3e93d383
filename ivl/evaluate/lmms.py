"""An lmms-eval model backed by an ivl checkpoint, for users who run lmms-eval task suites.

    pip install -e ".[eval]"
    lmms-eval --model ivl --model_args pretrained=runs/stage3/model,device=cuda,batch_size=8 --tasks mmbench_en_dev

lmms-eval finds it through the ``lmms_eval.models`` entry point (``manifest``). Generation runs through the same
batched engine as ``python -m ivl.evaluate`` and the server. lmms-eval's log-likelihood requests (a few
multiple-choice tasks score options by likelihood) are not supported: ivl scores by generation.
"""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from ivl.serve.engine import ChatEngine, Prompt, Sampling
from ivl.serve.loading import load


def manifest():
    """The ``lmms_eval.models`` entry point: registers this class as model ``ivl``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="ivl", simple_class_path="ivl.evaluate.lmms.InfiniteVLLMM", aliases=("infinitevl",))


class InfiniteVLLMM(lmms):
    def __init__(
        self,
        pretrained: str,
        device: str = "cuda",
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        video_frames: int = 32,
        **kwargs,
    ) -> None:
        super().__init__()
        model, processor, _ = load(pretrained, device, dtype)
        self.engine = ChatEngine(model, processor, capacity=int(batch_size))
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.video_frames = int(video_frames)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        prompts = [self._prompt(*request.args) for request in requests]
        outputs = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            texts = [""] * len(batch)
            for step in self.engine.generate(batch):
                for i, delta in enumerate(step):
                    if delta is not None:
                        texts[i] += delta.text
            outputs.extend(texts)
            if self.cache_hook is not None:
                for prompt, text in zip(batch, texts):
                    self.cache_hook.add_partial("generate_until", (prompt.text,), text)
        return outputs

    def _prompt(self, context: str, gen_kwargs: dict, doc_to_visual, doc_id, task, split) -> Prompt:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        images, videos = [], []
        for visual in visuals or []:
            if isinstance(visual, Image.Image):
                images.append(visual.convert("RGB"))
            elif isinstance(visual, str):  # lmms-eval passes videos as file paths
                videos.append(self._frames(visual))
            else:
                raise ValueError(
                    f"{task}/{doc_id}: unsupported visual {type(visual).__name__} (images and video paths are)"
                )
        content = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
        content.append({"type": "text", "text": context.replace("<image>", "").strip()})
        text = self.engine.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u != "\n\n"]
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        sampling = Sampling(
            max_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            temperature=temperature if gen_kwargs.get("do_sample", temperature > 0) else 0.0,
            top_p=float(gen_kwargs.get("top_p") or 1.0),
            stop=until,
        )
        return Prompt(text, images, videos, sampling)

    def _frames(self, path: str):
        from ivl.data.corpus import Media
        from ivl.data.media import load_video

        frames, _ = load_video(
            Media("video", path=path, options={"nframes": self.video_frames}), path, max_frames=self.video_frames
        )
        return frames

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "ivl's lmms-eval model scores by generation; log-likelihood tasks are not "
            "supported (use the task's generation variant)"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("ivl's lmms-eval model answers single-round requests")
