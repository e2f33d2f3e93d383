"""The Qwen2.5-VL teachers the stages distil from and the conversion starts from: the shapes of the tiny one and of
Qwen2.5-VL-3B (``qwen2_5_vl``), and a teacher folder built from a pretrained Llama-architecture language model
(``llama``: ``python -m ivl.teachers.llama``)."""
