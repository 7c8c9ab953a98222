"""The starvation lines of a training reader: whether its workers keep up with the consumer.

`Input Queue Starvation !!!!` when the ready examples drop below 10% of the queue capacity, `Input
Queue Starvation Over` when they are back above 50%. The warning is armed only once the queue has
first filled to 50% or a full capacity of examples has been served, so the initial fill does not
print it, but a reader that never keeps up still does.
"""

STARVATION_LOW = 0.1
STARVATION_HIGH = 0.5


class StarvationReport:
    """Prints the starvation lines of one reader as its examples are served."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.served = 0
        self.starving = False
        self.armed = False

    def example_served(self, ready):
        """One more example served, with `ready` examples still waiting (None: unknown)."""
        self.served += 1
        if ready is None:
            return
        if ready >= STARVATION_HIGH * self.capacity or self.served >= self.capacity:
            self.armed = True
        if not self.armed:
            return
        if not self.starving and ready < STARVATION_LOW * self.capacity:
            self.starving = True
            print("Input Queue Starvation !!!!", flush=True)
        elif self.starving and ready > STARVATION_HIGH * self.capacity:
            self.starving = False
            print("Input Queue Starvation Over", flush=True)
