"""Analyses with sparse autoencoders (SPEC §6): activation collection from Hugging Face models and
the music Transformer, feature statistics, BAE entropy dynamics, interventions and ComSem.

Modules: hooks (residual stream access), subjects (models and contexts), collect (sharded
stores), features (statistics on plain tensors), stats (statistics of trained SAEs/BAEs over a
collection), entropy_dynamics, intervene, judge (OpenAI-compatible client), comsem, cli.
Importing this package needs only torch; transformers, safetensors, matplotlib and tqdm load when used.
"""
