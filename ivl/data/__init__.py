"""Data: the Qwen2.5-VL processor and chat template, corpus formats, encoding, packing and the DataModules."""

from ivl.data.corpus import BadSample, CorpusSpec, Sample, read_corpus
from ivl.data.encoding import SampleEncoder
from ivl.data.modules import DocumentDataModule, ImageDataModule, VideoDataModule, VLDataModule
from ivl.data.processing import Processor

__all__ = ["BadSample", "CorpusSpec", "DocumentDataModule", "ImageDataModule", "Processor", "Sample",
           "SampleEncoder", "VLDataModule", "VideoDataModule", "read_corpus"]
