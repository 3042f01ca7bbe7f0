package interop;

import java.util.HashMap;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;

/** --name value options and --flag switches. */
final class Args {
    private final Map<String, String> values = new HashMap<>();
    private final Set<String> flags = new HashSet<>();

    Args(String[] argv, int from, Set<String> flagNames) {
        for (int i = from; i < argv.length; i++) {
            String a = argv[i];
            if (!a.startsWith("--")) {
                throw new IllegalArgumentException("unexpected argument " + a);
            }
            String name = a.substring(2);
            if (flagNames.contains(name)) {
                flags.add(name);
            } else if (i + 1 < argv.length) {
                values.put(name, argv[++i]);
            } else {
                throw new IllegalArgumentException("option --" + name + " needs a value");
            }
        }
    }

    String get(String name) {
        String v = values.get(name);
        if (v == null) {
            throw new IllegalArgumentException("option --" + name + " is required");
        }
        return v;
    }

    String get(String name, String fallback) {
        return values.getOrDefault(name, fallback);
    }

    int integer(String name, int fallback) {
        return values.containsKey(name) ? Integer.parseInt(values.get(name)) : fallback;
    }

    boolean flag(String name) {
        return flags.contains(name);
    }
}
