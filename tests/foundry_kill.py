"""Loaded by llm-foundry through `code_paths`: a callback that SIGKILLs the run at a batch, as a
node failure would (no exception, no cleanup), once the checkpoint before it is on disk."""
import os
import signal

from composer.core import Callback, Event
from llmfoundry.registry import callbacks


class KillAtBatch(Callback):
    def __init__(self, batch: int):
        self.batch = int(batch)

    def run_event(self, event, state, logger):
        if event == Event.BATCH_START and int(state.timestamp.batch) == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


callbacks.register("kill_at_batch", func=KillAtBatch)
