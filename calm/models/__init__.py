"""Model definitions: the autoencoder, the Llama backbone, CALM and the AR baseline."""

from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM, EnergyHead, InputCompression
from calm.models.transformer import KVCache, Transformer

__all__ = ["ARModel", "Autoencoder", "CALM", "EnergyHead", "InputCompression", "KVCache",
           "Transformer"]
