"""Reference application: bank1 pays bank2 through a reliable message.

bank1 (an asyncio service) debits account 1 and makes the transfer message durable
in one local transaction (``bank1.py``): an outbox row that a relay publishes
(``relay.py``), or with RocketMQ a half message committed after the local
transaction. bank2 (a sync service) credits the account exactly once per transfer
number (``bank2.py``); a transfer to a frozen account is sent back instead, with a
refund message written in the same transaction as the inbox row, and bank1 refunds
account 1 exactly once. ``demo.py`` runs them as processes and checks that no money
was created or lost.
"""

TOPIC = "bank-transfer"
#: bank2's de-duplication group: its inbox rows are keyed by (this, transfer number).
CONSUMER_GROUP = "bank2"
#: Where bank2 puts, with the reason, a RocketMQ message it can never apply.
DEAD_LETTER_TOPIC = "bank-transfer-dlq"
#: bank2's replies: a transfer it refused to credit, to be refunded by bank1.
REFUND_TOPIC = "bank-refund"
#: bank1's de-duplication group for the refunds.
REFUND_GROUP = "bank1-refunds"
#: Where bank1 puts, with the reason, a RocketMQ refund message it can never apply.
REFUND_DEAD_LETTER_TOPIC = "bank-refund-dlq"
