"""Reference application: bank1 pays bank2 through a reliable message.

bank1 debits account 1 and writes the transfer message in one local transaction
(``bank1.py``); a relay publishes it to the SQL transport (``relay.py``); bank2
credits account 2 exactly once per transfer number (``bank2.py``). ``demo.py``
runs all three as processes and checks that no money was created or lost.
"""

TOPIC = "bank-transfer"
CONSUMER_GROUP = "bank2"
