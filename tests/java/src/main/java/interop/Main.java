package interop;

import java.util.Arrays;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * A Java "bank1" (producer) and "bank2" (consumer) of the write-up's transfer messages,
 * on RocketMQ 4.x (remoting client) or 5.x (gRPC client), for the Python adapter's
 * interoperability tests. Every event is one JSON line on stdout.
 *
 * <pre>
 * produce --api 4|5 --address A --topic T --count N --prefix P [--repeat R]
 *         [--transactional [--lose-commit] [--check-timeout S]] [--group G]
 *         [--tag TAG] [--account NO] [--amount X]
 * consume --api 4|5 --address A --topic T --group G --expect N --timeout S
 *         [--filter-prefix P] [--settle S]
 * view    --address NAMESRV --topic T --msg-id ID[,ID...]   (4.x: look messages up by id,
 *         as the console and mqadmin queryMsgByUniqueKey do)
 * </pre>
 */
public final class Main {
    private Main() {}

    public static void main(String[] argv) {
        if (argv.length == 0) {
            usage();
            System.exit(64);
        }
        int code;
        try {
            switch (argv[0]) {
                case "produce" -> code = produce(new Args(argv, 1, Set.of("transactional", "lose-commit")));
                case "consume" -> code = consume(new Args(argv, 1, Set.of()));
                case "view" -> code = Api4.view(new Args(argv, 1, Set.of()));
                default -> {
                    usage();
                    code = 64;
                }
            }
        } catch (IllegalArgumentException e) {
            Out.event("event", "error", "error", e.getMessage());
            usage();
            code = 64;
        } catch (Throwable t) {
            Out.event("event", "error", "error", t.getClass().getName() + ": " + t.getMessage());
            t.printStackTrace();
            code = 1;
        }
        // The clients keep non-daemon threads; shutdown was already attempted.
        Runtime.getRuntime().halt(code);
    }

    private static void usage() {
        System.err.println("usage: java -jar java-interop.jar produce --api 4|5 --address A --topic T "
            + "--count N --prefix P [--repeat R] [--transactional [--lose-commit] [--check-timeout S]] "
            + "[--group G] [--tag TAG]\n"
            + "       java -jar java-interop.jar consume --api 4|5 --address A --topic T --group G "
            + "--expect N --timeout S [--filter-prefix P] [--settle S]\n"
            + "       java -jar java-interop.jar view --address NAMESRV --topic T --msg-id ID");
    }

    // -- bank1 -------------------------------------------------------------------------

    /** What bank1 sends: the write-up's account-change event. */
    static final class Transfers {
        final String prefix;
        final int count;
        final int repeat;
        final String account;
        final double amount;
        final String tag;
        final boolean loseCommit;
        /** txNo -> how often the broker checked back (for --lose-commit). */
        final Map<String, AtomicInteger> checks = new ConcurrentHashMap<>();

        Transfers(Args a) {
            prefix = a.get("prefix");
            count = a.integer("count", 1);
            repeat = a.integer("repeat", 1);
            account = a.get("account", "1");
            amount = Double.parseDouble(a.get("amount", "100.5"));
            tag = a.get("tag", "transfer");
            loseCommit = a.flag("lose-commit");
        }

        String txNo(int i) {
            return prefix + i;
        }

        byte[] body(String txNo) {
            return Json.object("accountNo", account, "amount", amount, "txNo", txNo)
                .getBytes(java.nio.charset.StandardCharsets.UTF_8);
        }

        String traceId(String txNo) {
            return "trace-" + txNo;
        }

        boolean ours(String txNo) {
            return txNo != null && checks.containsKey(txNo);
        }

        /** A check-back's answer: COMMIT for our own transfers, "unknown" for others'. */
        boolean checked(String txNo, String msgId) {
            AtomicInteger n = txNo == null ? null : checks.get(txNo);
            boolean mine = n != null;
            if (mine) {
                n.incrementAndGet();
            }
            Out.event("event", "checked", "txNo", txNo, "msgId", msgId,
                      "answer", mine ? "COMMIT" : "UNKNOWN");
            return mine;
        }

        boolean allChecked() {
            return checks.values().stream().allMatch(n -> n.get() > 0);
        }
    }

    /** The txNo of a JSON body, read without a JSON library (our own shape only). */
    static String txNoOf(String body) {
        int at = body.indexOf("\"txNo\"");
        if (at < 0) {
            return null;
        }
        int start = body.indexOf('"', body.indexOf(':', at) + 1);
        int end = start < 0 ? -1 : body.indexOf('"', start + 1);
        return end < 0 ? null : body.substring(start + 1, end);
    }

    interface Bank1 extends AutoCloseable {
        /** Sends one transfer; returns its RocketMQ message id. */
        String send(String txNo) throws Exception;

        @Override
        void close();
    }

    private static int produce(Args a) throws Exception {
        Transfers t = new Transfers(a);
        String api = a.get("api");
        String address = a.get("address");
        String topic = a.get("topic");
        boolean transactional = a.flag("transactional");
        if (t.loseCommit && !transactional) {
            throw new IllegalArgumentException("--lose-commit needs --transactional");
        }
        for (int i = 0; i < t.count; i++) {
            t.checks.put(t.txNo(i), new AtomicInteger());
        }
        String group = a.get("group", "java-bank1-" + t.prefix.replaceAll("[^A-Za-z0-9_-]", "_"));
        Bank1 bank1 = switch (api) {
            case "4" -> new Api4.Producer4(address, topic, group, transactional, t);
            case "5" -> new Api5.Producer5(address, topic, transactional, t);
            default -> throw new IllegalArgumentException("--api must be 4 or 5");
        };
        int code = 0;
        try {
            for (int r = 0; r < t.repeat; r++) {
                for (int i = 0; i < t.count; i++) {
                    String txNo = t.txNo(i);
                    String msgId = bank1.send(txNo);
                    Out.event("event", "sent", "txNo", txNo, "msgId", msgId, "copy", r,
                              "transactional", transactional, "commit", transactional && !t.loseCommit);
                }
            }
            if (t.loseCommit) {
                long deadline = System.nanoTime()
                    + TimeUnit.SECONDS.toNanos(a.integer("check-timeout", 90));
                while (!t.allChecked() && System.nanoTime() < deadline) {
                    Thread.sleep(200);
                }
                if (!t.allChecked()) {
                    Out.event("event", "check-timeout", "unchecked",
                              t.checks.entrySet().stream().filter(e -> e.getValue().get() == 0)
                                  .map(Map.Entry::getKey).sorted().toList());
                    code = 3;
                } else {
                    Thread.sleep(1000); // let the last check answer reach the broker
                }
            }
        } finally {
            closeQuietly(bank1);
        }
        Out.event("event", "done", "sent", t.count * t.repeat);
        return code;
    }

    // -- bank2 -------------------------------------------------------------------------

    /** Counts and prints what bank2 receives; done once enough wanted messages came. */
    static final class Receiver {
        final String prefix;
        final CountDownLatch enough;
        final AtomicInteger matched = new AtomicInteger();
        final AtomicInteger seen = new AtomicInteger();

        Receiver(String prefix, int expect) {
            this.prefix = prefix;
            this.enough = new CountDownLatch(expect);
        }

        boolean wanted(String body, Collection<String> keys, Map<String, String> properties) {
            if (prefix == null || prefix.isEmpty()) {
                return true;
            }
            if (body != null && body.contains(prefix)) {
                return true;
            }
            for (String k : keys) {
                if (k.startsWith(prefix)) {
                    return true;
                }
            }
            for (String v : properties.values()) {
                if (v != null && v.startsWith(prefix)) {
                    return true;
                }
            }
            return false;
        }

        void received(String api, String topic, String msgId, String body, List<String> keys,
                      String tag, Map<String, String> properties, int attempt) {
            seen.incrementAndGet();
            if (!wanted(body, keys, properties)) {
                return;
            }
            matched.incrementAndGet();
            Out.event("event", "received", "api", api, "topic", topic, "msgId", msgId, "body", body,
                      "keys", keys, "tag", tag, "properties", properties, "attempt", attempt);
            enough.countDown();
        }
    }

    interface Bank2 extends AutoCloseable {
        @Override
        void close();
    }

    private static int consume(Args a) throws Exception {
        String api = a.get("api");
        String address = a.get("address");
        String topic = a.get("topic");
        String group = a.get("group");
        int expect = a.integer("expect", 1);
        int timeout = a.integer("timeout", 60);
        int settle = a.integer("settle", 0);
        Receiver receiver = new Receiver(a.get("filter-prefix", null), expect);
        Bank2 bank2 = switch (api) {
            case "4" -> new Api4.Consumer4(address, topic, group, receiver);
            case "5" -> new Api5.Consumer5(address, topic, group, receiver);
            default -> throw new IllegalArgumentException("--api must be 4 or 5");
        };
        int code;
        try {
            Out.event("event", "ready", "api", api, "topic", topic, "group", group);
            boolean done = receiver.enough.await(timeout, TimeUnit.SECONDS);
            if (done && settle > 0) {
                Thread.sleep(settle * 1000L); // late copies would show up now
            }
            code = done ? 0 : 2;
            Out.event("event", done ? "done" : "timeout", "matched", receiver.matched.get(),
                      "seen", receiver.seen.get(), "expected", expect);
        } finally {
            closeQuietly(bank2);
        }
        return code;
    }

    /** Closes a client, giving up after a few seconds (a shutdown may hang). */
    static void closeQuietly(AutoCloseable c) {
        Thread t = new Thread(() -> {
            try {
                c.close();
            } catch (Exception e) {
                Out.log("close failed: " + e);
            }
        }, "interop-close");
        t.setDaemon(true);
        t.start();
        try {
            t.join(5000);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    static List<String> sortedKeys(Collection<String> keys) {
        String[] k = keys.stream().filter(s -> s != null && !s.isBlank()).distinct().toArray(String[]::new);
        Arrays.sort(k);
        return List.of(k);
    }
}
