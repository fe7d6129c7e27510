"""Model definitions: the autoencoder, the Llama backbone, CALM with its generative heads and the
AR baseline."""

from calm.models.ar import ARModel
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM, InputCompression
from calm.models.diffusion_head import DiffusionHead
from calm.models.energy_head import EnergyHead
from calm.models.flow_head import FlowHead
from calm.models.transformer import KVCache, Transformer

__all__ = ["ARModel", "Autoencoder", "CALM", "DiffusionHead", "EnergyHead", "FlowHead",
           "InputCompression", "KVCache", "Transformer"]
