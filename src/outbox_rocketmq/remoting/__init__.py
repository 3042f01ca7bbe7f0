"""RocketMQ's remoting protocol (4.x brokers, and 5.x brokers' remoting port), in
pure Python: the wire format, connections, and a client for routes, heartbeats,
sends, transactions and check-backs."""
