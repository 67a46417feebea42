"""The peak memory of one streamed fit, measured in a process of its own so that no earlier test's
freed heap hides or inflates it: `python tests/streamed_peak.py RAY_ADDRESS PARQUET_FOLDER BLOCKS RUNS`
prints the peak unique set size above the one before training, in bytes, as `peak_bytes=N` (Ray
may print its own lines to stdout as the process ends)."""

import sys
import threading

import psutil


class PeakUSS:
    """The largest unique set size of this process while the block runs, sampled on a thread:
    its own memory, without the object store's shared pages that it maps (which RSS counts)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_full_info().uss)
            self._stop.wait(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


if __name__ == "__main__":
    address, folder, blocks, runs = sys.argv[1:]
    import ray

    from ray_ensembles import DeepEnsemble, Trainer
    from ray_ensembles.on_ray.ray_internals import quiet_ray_data

    ray.init(address=address, log_to_driver=False)
    quiet_ray_data("WARNING")
    dataset = ray.data.read_parquet(folder, override_num_blocks=int(blocks))
    trainer = Trainer(DeepEnsemble(13, num_members=2, hidden_dim=16), dataset, target="y", train_batch_size=4096,
                      train_num_epochs=1, shuffle_buffer_rows=1 << 16, results_folder=runs)
    before = psutil.Process().memory_full_info().uss
    with PeakUSS() as memory:
        trainer.train()
    print(f"peak_bytes={memory.peak - before}", flush=True)
