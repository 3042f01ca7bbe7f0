package interop;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.apache.rocketmq.client.apis.ClientConfiguration;
import org.apache.rocketmq.client.apis.ClientServiceProvider;
import org.apache.rocketmq.client.apis.consumer.ConsumeResult;
import org.apache.rocketmq.client.apis.consumer.FilterExpression;
import org.apache.rocketmq.client.apis.consumer.FilterExpressionType;
import org.apache.rocketmq.client.apis.consumer.PushConsumer;
import org.apache.rocketmq.client.apis.message.Message;
import org.apache.rocketmq.client.apis.message.MessageView;
import org.apache.rocketmq.client.apis.producer.Producer;
import org.apache.rocketmq.client.apis.producer.ProducerBuilder;
import org.apache.rocketmq.client.apis.producer.SendReceipt;
import org.apache.rocketmq.client.apis.producer.Transaction;
import org.apache.rocketmq.client.apis.producer.TransactionResolution;

/** bank1 and bank2 over the 5.x gRPC client (rocketmq-client-java 5.0.7) through the proxy. */
final class Api5 {
    private Api5() {}

    static ClientConfiguration configuration(String endpoints) {
        return ClientConfiguration.newBuilder().setEndpoints(endpoints)
            .setRequestTimeout(Duration.ofSeconds(10)).build();
    }

    static String text(ByteBuffer body) {
        ByteBuffer copy = body.duplicate();
        byte[] bytes = new byte[copy.remaining()];
        copy.get(bytes);
        return new String(bytes, StandardCharsets.UTF_8);
    }

    static final class Producer5 implements Main.Bank1 {
        private final ClientServiceProvider provider = ClientServiceProvider.loadService();
        private final Producer producer;
        private final String topic;
        private final boolean transactional;
        private final Main.Transfers transfers;

        Producer5(String endpoints, String topic, boolean transactional, Main.Transfers t) throws Exception {
            this.topic = topic;
            this.transactional = transactional;
            this.transfers = t;
            ProducerBuilder builder = provider.newProducerBuilder()
                .setClientConfiguration(configuration(endpoints)).setTopics(topic);
            if (transactional) {
                // Through the proxy the broker may ask any producer of the topic, so
                // answer COMMIT only for our own transfers and "ask again" otherwise.
                builder.setTransactionChecker((MessageView view) -> {
                    String txNo = Main.txNoOf(text(view.getBody()));
                    return t.checked(txNo, view.getMessageId().toString())
                        ? TransactionResolution.COMMIT : TransactionResolution.UNKNOWN;
                });
            }
            producer = builder.build();
        }

        @Override
        public String send(String txNo) throws Exception {
            Message msg = provider.newMessageBuilder().setTopic(topic).setTag(transfers.tag)
                .setKeys(txNo, transfers.account).addProperty("traceId", transfers.traceId(txNo))
                .setBody(transfers.body(txNo)).build();
            SendReceipt receipt;
            if (transactional) {
                Transaction tx = producer.beginTransaction();
                receipt = producer.send(msg, tx);
                // bank1 debits its account here, then commits; with --lose-commit the
                // commit "is lost", so only the check-back can commit.
                if (!transfers.loseCommit) {
                    tx.commit();
                }
            } else {
                receipt = producer.send(msg);
            }
            return receipt.getMessageId().toString();
        }

        @Override
        public void close() {
            try {
                producer.close();
            } catch (java.io.IOException e) {
                Out.log("producer close: " + e);
            }
        }
    }

    static final class Consumer5 implements Main.Bank2 {
        private final PushConsumer consumer;

        Consumer5(String endpoints, String topic, String group, Main.Receiver receiver) throws Exception {
            ClientServiceProvider provider = ClientServiceProvider.loadService();
            consumer = provider.newPushConsumerBuilder()
                .setClientConfiguration(configuration(endpoints))
                .setConsumerGroup(group)
                .setSubscriptionExpressions(Map.of(topic, new FilterExpression("*", FilterExpressionType.TAG)))
                .setConsumptionThreadCount(4)
                .setMessageListener(view -> {
                    List<String> keys = new ArrayList<>(view.getKeys());
                    Map<String, String> props = new LinkedHashMap<>(view.getProperties());
                    receiver.received("5", view.getTopic(), view.getMessageId().toString(),
                                      text(view.getBody()), keys, view.getTag().orElse(null), props,
                                      view.getDeliveryAttempt());
                    return ConsumeResult.SUCCESS;
                })
                .build();
        }

        @Override
        public void close() {
            try {
                consumer.close();
            } catch (java.io.IOException e) {
                Out.log("consumer close: " + e);
            }
        }
    }
}
