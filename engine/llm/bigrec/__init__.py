"""BIGRec (Bao et al.): the user's history titles in an Alpaca prompt, LoRA on a causal LM, the
generated title grounded to a catalogue item.

- :mod:`engine.llm.bigrec.model`   -- :class:`LLMConfig`, the tiny offline LLaMA, SmolLM2, :func:`load_llm`
- :mod:`engine.llm.bigrec.prompts` -- prompt presets, tokenising with history truncation, the per-sample loss
- :mod:`engine.llm.bigrec.effort`  -- the length-sorted batched effort pass
- :mod:`engine.llm.bigrec.backend` -- :class:`BigRecBackend`, the protocol adapter
"""
