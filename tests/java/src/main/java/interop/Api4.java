package interop;

import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.apache.rocketmq.client.consumer.DefaultMQPushConsumer;
import org.apache.rocketmq.client.consumer.listener.ConsumeConcurrentlyStatus;
import org.apache.rocketmq.client.consumer.listener.MessageListenerConcurrently;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.client.producer.LocalTransactionState;
import org.apache.rocketmq.client.producer.SendResult;
import org.apache.rocketmq.client.producer.SendStatus;
import org.apache.rocketmq.client.producer.TransactionListener;
import org.apache.rocketmq.client.producer.TransactionMQProducer;
import org.apache.rocketmq.client.producer.TransactionSendResult;
import org.apache.rocketmq.common.consumer.ConsumeFromWhere;
import org.apache.rocketmq.common.message.Message;
import org.apache.rocketmq.common.message.MessageClientIDSetter;
import org.apache.rocketmq.common.message.MessageExt;

/** bank1 and bank2 over the 4.x remoting client (rocketmq-client 4.9.7), as the write-up has them. */
final class Api4 {
    private Api4() {}

    static final class Producer4 implements Main.Bank1 {
        private final DefaultMQProducer producer;
        private final String topic;
        private final boolean transactional;
        private final Main.Transfers transfers;

        Producer4(String namesrv, String topic, String group, boolean transactional, Main.Transfers t)
                throws Exception {
            this.topic = topic;
            this.transactional = transactional;
            this.transfers = t;
            if (transactional) {
                TransactionMQProducer tp = new TransactionMQProducer(group);
                tp.setTransactionListener(new TransactionListener() {
                    @Override
                    public LocalTransactionState executeLocalTransaction(Message msg, Object arg) {
                        // bank1 debits its account here; with --lose-commit the outcome
                        // "never reaches" the broker, so only the check-back can commit.
                        return t.loseCommit ? LocalTransactionState.UNKNOW
                                            : LocalTransactionState.COMMIT_MESSAGE;
                    }

                    @Override
                    public LocalTransactionState checkLocalTransaction(MessageExt msg) {
                        String txNo = Main.txNoOf(new String(msg.getBody(), StandardCharsets.UTF_8));
                        return t.checked(txNo, msg.getMsgId()) ? LocalTransactionState.COMMIT_MESSAGE
                                                                : LocalTransactionState.UNKNOW;
                    }
                });
                producer = tp;
            } else {
                producer = new DefaultMQProducer(group);
            }
            producer.setNamesrvAddr(namesrv);
            producer.setVipChannelEnabled(false);
            producer.setInstanceName("bank1-" + ProcessHandle.current().pid());
            producer.setSendMsgTimeout(10000);
            producer.start();
        }

        @Override
        public String send(String txNo) throws Exception {
            Message msg = new Message(topic, transfers.tag, transfers.body(txNo));
            msg.setKeys(List.of(txNo, transfers.account)); // two keys, space-separated on the wire
            msg.putUserProperty("traceId", transfers.traceId(txNo));
            SendResult result;
            if (transactional) {
                TransactionSendResult tr = ((TransactionMQProducer) producer).sendMessageInTransaction(msg, null);
                if (tr.getLocalTransactionState() == LocalTransactionState.ROLLBACK_MESSAGE) {
                    throw new IllegalStateException("local transaction rolled back for " + txNo);
                }
                result = tr;
            } else {
                result = producer.send(msg);
            }
            if (result.getSendStatus() != SendStatus.SEND_OK) {
                throw new IllegalStateException("send of " + txNo + " answered " + result.getSendStatus());
            }
            return result.getMsgId();
        }

        @Override
        public void close() {
            producer.shutdown();
        }
    }

    /** Looks a message up by its id (the producer's unique key), as operators do. */
    static int view(Args a) throws Exception {
        String[] msgIds = a.get("msg-id").split(",");
        DefaultMQProducer admin = new DefaultMQProducer("java-view-" + ProcessHandle.current().pid());
        admin.setNamesrvAddr(a.get("address"));
        admin.setVipChannelEnabled(false);
        admin.setInstanceName("view-" + ProcessHandle.current().pid());
        admin.start();
        int code = 0;
        try {
            for (String msgId : msgIds) {
                if (!viewOne(admin, a.get("topic"), msgId)) {
                    code = 4;
                }
            }
        } finally {
            Main.closeQuietly(admin::shutdown);
        }
        return code;
    }

    private static boolean viewOne(DefaultMQProducer admin, String topic, String msgId) {
        String nearly;
        try {
            nearly = MessageClientIDSetter.getNearlyTimeFromID(msgId).toInstant().toString();
        } catch (RuntimeException e) {
            nearly = "unparsable: " + e;
        }
        try {
            MessageExt m = admin.viewMessage(topic, msgId);
            Out.event("event", "viewed", "msgId", msgId, "found", true, "timeFromId", nearly,
                      "storeTime", java.time.Instant.ofEpochMilli(m.getStoreTimestamp()).toString(),
                      "body", new String(m.getBody(), StandardCharsets.UTF_8));
            return true;
        } catch (Exception e) {
            Out.event("event", "viewed", "msgId", msgId, "found", false, "timeFromId", nearly,
                      "error", e.getClass().getSimpleName() + ": " + e.getMessage());
            return false;
        }
    }

    static final class Consumer4 implements Main.Bank2 {
        private final DefaultMQPushConsumer consumer;

        Consumer4(String namesrv, String topic, String group, Main.Receiver receiver) throws Exception {
            consumer = new DefaultMQPushConsumer(group);
            consumer.setNamesrvAddr(namesrv);
            consumer.setVipChannelEnabled(false);
            consumer.setInstanceName("bank2-" + ProcessHandle.current().pid());
            // A new group: start from the queues' beginnings (the prefix filter picks ours).
            consumer.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
            consumer.setConsumeThreadMin(2);
            consumer.setConsumeThreadMax(4);
            consumer.setPullBatchSize(32);
            consumer.subscribe(topic, "*");
            consumer.registerMessageListener((MessageListenerConcurrently) (messages, context) -> {
                for (MessageExt m : messages) {
                    String keys = m.getKeys();
                    List<String> keyList = keys == null || keys.isBlank() ? List.of()
                        : Arrays.stream(keys.split(" ")).filter(k -> !k.isEmpty()).toList();
                    Map<String, String> props = new LinkedHashMap<>(m.getProperties());
                    receiver.received("4", m.getTopic(), m.getMsgId(),
                                      new String(m.getBody(), StandardCharsets.UTF_8), keyList,
                                      m.getTags(), props, m.getReconsumeTimes() + 1);
                }
                return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
            });
            consumer.start();
        }

        @Override
        public void close() {
            consumer.shutdown();
        }
    }
}
