"""Put on PYTHONPATH of a train.py subprocess: Composer's CheckpointSaver polls the object store
for an uploaded checkpoint every 30 s before it uploads the `latest` symlink (a minute per tiny
run); Composer keeps that interval an attribute so that tests can shorten it. Nothing else changes."""
try:
    from composer.callbacks import checkpoint_saver as _cs
except ImportError:  # not a Composer process
    _cs = None

if _cs is not None:
    _init = _cs.CheckpointSaver.__init__

    def _fast_init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        self._symlink_upload_wait_before_next_try_in_seconds = 0.5

    _cs.CheckpointSaver.__init__ = _fast_init
