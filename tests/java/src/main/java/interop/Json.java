package interop;

import java.util.Collection;
import java.util.Map;
import java.util.TreeMap;

/** A tiny JSON writer: enough for one line per event (strings, numbers, lists, maps). */
final class Json {
    private Json() {}

    static String quote(String s) {
        if (s == null) {
            return "null";
        }
        StringBuilder out = new StringBuilder(s.length() + 2).append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"': out.append("\\\""); break;
                case '\\': out.append("\\\\"); break;
                case '\n': out.append("\\n"); break;
                case '\r': out.append("\\r"); break;
                case '\t': out.append("\\t"); break;
                default:
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
            }
        }
        return out.append('"').toString();
    }

    static String value(Object v) {
        if (v == null) {
            return "null";
        }
        if (v instanceof Number || v instanceof Boolean) {
            return v.toString();
        }
        if (v instanceof Map<?, ?> m) {
            StringBuilder out = new StringBuilder("{");
            boolean first = true;
            for (Map.Entry<?, ?> e : new TreeMap<>(m).entrySet()) {
                if (!first) {
                    out.append(',');
                }
                first = false;
                out.append(quote(String.valueOf(e.getKey()))).append(':').append(value(e.getValue()));
            }
            return out.append('}').toString();
        }
        if (v instanceof Collection<?> c) {
            StringBuilder out = new StringBuilder("[");
            boolean first = true;
            for (Object o : c) {
                if (!first) {
                    out.append(',');
                }
                first = false;
                out.append(value(o));
            }
            return out.append(']').toString();
        }
        return quote(v.toString());
    }

    /** An object from alternating names and values, keeping their order. */
    static String object(Object... namesAndValues) {
        StringBuilder out = new StringBuilder("{");
        for (int i = 0; i < namesAndValues.length; i += 2) {
            if (i > 0) {
                out.append(',');
            }
            out.append(quote(String.valueOf(namesAndValues[i]))).append(':')
               .append(value(namesAndValues[i + 1]));
        }
        return out.append('}').toString();
    }
}
