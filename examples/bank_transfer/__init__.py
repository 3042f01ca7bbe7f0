"""Reference application: bank1 pays bank2 through a reliable message.

bank1 debits account 1 and makes the transfer message durable in one local
transaction (``bank1.py``): an outbox row that a relay publishes (``relay.py``), or
with RocketMQ a half message committed after the local transaction. bank2 credits
account 2 exactly once per transfer number (``bank2.py``). ``demo.py`` runs all
three as processes and checks that no money was created or lost.
"""

TOPIC = "bank-transfer"
#: bank2's de-duplication group: its inbox rows are keyed by (this, transfer number).
CONSUMER_GROUP = "bank2"
#: Where bank2 puts, with the reason, a RocketMQ message it can never apply.
DEAD_LETTER_TOPIC = "bank-transfer-dlq"
