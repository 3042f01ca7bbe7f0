package interop;

import java.io.PrintStream;
import java.nio.charset.StandardCharsets;

/** One JSON line per event on stdout (the clients' own chatter goes to stderr or files). */
final class Out {
    private static final PrintStream STDOUT =
        new PrintStream(new java.io.FileOutputStream(java.io.FileDescriptor.out), true, StandardCharsets.UTF_8);

    private Out() {}

    static synchronized void event(Object... namesAndValues) {
        STDOUT.println(Json.object(namesAndValues));
        STDOUT.flush();
    }

    static void log(String text) {
        System.err.println("[java-interop] " + text);
    }
}
