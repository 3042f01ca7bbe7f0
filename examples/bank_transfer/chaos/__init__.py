"""Chaos runs of the bank-transfer application: ``python -m bank_transfer.chaos``.

The services of the example (bank1, relay, bank2) run as separate processes, as in
the demo, while faults are injected: processes SIGKILLed at named points of the
send and receive paths (``faults``: armed by environment variables, so the
services' code carries only hooks), two relays at once, the broker or a database
server stopped and started, a handler failing at random, and malformed messages
put straight onto the topic. After each scenario the harness waits until things
settle and audits the books from the databases themselves (``verify``).
"""
