"""Release strategies and everything a release stands on while it runs: analysis, plan, replay, serving
on loopback, lock, recovery.
"""
