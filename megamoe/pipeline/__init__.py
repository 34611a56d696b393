"""Pipeline parallelism: splitting the model into (virtual) stages and the schedules that drive
micro-batches through them (no pipelining, 1F1B, interleaved 1F1B), with p2p through megamoe.parallel.comm.
"""
