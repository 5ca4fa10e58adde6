"""User preferences and item descriptions written by an LLM (or an offline template).

``rayrec prefs generate JOB.yaml`` summarises each user's taste from the *training* part
of their sequence and writes a description per item, into ``<data.path>/prefs/``
(``user_prefs.parquet``, ``item_descriptions.parquet``, ``summary.json``); the feature step
then embeds them. Backends: ``openai`` (any OpenAI-compatible chat endpoint) and
``template`` (offline, from item metadata).
"""
