"""Data: the Qwen2.5-VL processor and chat template (and, later, corpora, packing and DataModules)."""

from ivl.data.processing import Processor

__all__ = ["Processor"]
from ivl.data.corpus import BadSample, CorpusSpec, Sample, read_corpus
from ivl.data.encoding import SampleEncoder
from ivl.data.modules import DocumentDataModule, ImageDataModule, VideoDataModule, VLDataModule

__all__ += ["BadSample", "CorpusSpec", "DocumentDataModule", "ImageDataModule", "Sample", "SampleEncoder",
            "VLDataModule", "VideoDataModule", "read_corpus"]
