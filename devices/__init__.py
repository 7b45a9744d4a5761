"""otaro.devices — device profiles and the latency profiler (`otaro profile`).

Not built yet (its own issue).
"""
