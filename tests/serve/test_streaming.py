"""jmoe.serve.streaming.Mailbox: updates posted from another thread reach their queues in order,
with one wake-up of the event loop for all that were posted before it ran."""

import asyncio
import threading

from jmoe.serve.streaming import Mailbox


def test_a_batch_of_posts_wakes_the_loop_once_and_arrives_in_order():
    loop = asyncio.new_event_loop()
    try:
        wakeups = []
        schedule = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wakeups.append(a) or schedule(*a)
        box = Mailbox(loop)
        queues = [asyncio.Queue() for _ in range(4)]

        def engine_step(step):  # one decode step: a token for every stream
            for i, queue in enumerate(queues):
                box.post(queue, (step, i))

        for step in range(3):  # the loop is not running: each step's posts wait for it
            thread = threading.Thread(target=engine_step, args=(step,))
            thread.start()
            thread.join()
            assert len(wakeups) == step + 1  # one wake-up per step, not per post
            loop.run_until_complete(asyncio.sleep(0))  # the loop runs and delivers
        got = [[q.get_nowait() for _ in range(q.qsize())] for q in queues]
        assert got == [[(step, i) for step in range(3)] for i in range(4)]
    finally:
        loop.close()
