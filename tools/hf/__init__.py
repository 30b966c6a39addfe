"""The Hugging Face wing: the library the interop commands share, no command of its own.

``arch`` says which transformers architectures moeforge converts to and from and translates their
configs, ``mapping`` names and lays out each tensor on both sides, and ``checkpoint`` reads and
writes the two checkpoint formats (a Hugging Face safetensors folder, a moeforge DCP checkpoint).
The commands users run stay flat beside this folder: ``python -m tools.export_hf``,
``tools.import_hf`` and ``tools.upcycle_hf``.
"""
