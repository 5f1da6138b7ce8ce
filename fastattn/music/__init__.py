"""Music Transformer on POP909 and a synthetic corpus (SPEC §4).

Modules: ``tokens`` (note arrays, note-/event-based tokens, MIDI I/O), ``pop909`` (POP909 and
MIDI-folder preparation, cached), ``synthetic`` (embedded corpus), ``data`` (windows, batches),
``model`` (the Transformer), ``train``, ``generate``, ``metrics``, ``evaluate``, ``demo``, ``cli``.
symusic, matplotlib and tqdm are imported lazily inside functions.
"""
