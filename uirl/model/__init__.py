"""Encoder (HF AutoModel + PEFT LoRA), pooling, the interest model and batching."""

from uirl.model.batching import Example, TextBank
from uirl.model.encoder import Encoder, load_encoder
from uirl.model.interest import InterestModel, UserBatch

__all__ = ["Encoder", "Example", "InterestModel", "TextBank", "UserBatch", "load_encoder"]
