"""The train.py run: its body (recipe), the builders it calls, the dry-run plan, and what keeps a
run from losing work (checkpointing, resume, lock, safety, remote_save).
"""
