import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ThreadFactory;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

import net.dv8tion.jda.api.JDA;
import net.dv8tion.jda.api.events.ExceptionEvent;
import net.dv8tion.jda.api.utils.SessionControllerAdapter;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * A JDA 5 {@code SessionController} that asks gateway-queue before each shard identifies.
 * Checked against JDA 5.6.1; needs Java 16 or later (java.net.http since 11, and since 16
 * cancelling a request closes its connection, which frees the shard's place in the queue).
 *
 * <pre>{@code
 * var queue = new GatewayQueueController("http://gateway-queue/", System.getenv("QUEUE_AUTH_TOKEN"));
 * DefaultShardManagerBuilder.createDefault(token).setSessionController(queue).build();
 * }</pre>
 *
 * <p>A request waits as long as the queue needs (up to 6 hours). Once the queue answers {@code 200}
 * the node runs as in JDA's own controllers: {@code run(false)} connects and returns at READY or when
 * the attempt fails. {@code removeSession} (JDA shutting down) cancels the waiting request, whose
 * connection closes so the queue drops it at no cost, or the retry that is scheduled.
 *
 * <ul>
 * <li>{@code 503} (the queue is restarting) and network errors, refused connections included: asked
 *     again after a delay that starts at 1 s and doubles up to 30 s, half of it random.
 * <li>Any other status (a wrong URL or {@code QUEUE_AUTH_TOKEN}): an ERROR log line and an
 *     {@link ExceptionEvent} carrying a {@link GatewayQueueException} on the shard's JDA, then asked
 *     again after a delay that starts at 30 s and doubles up to 10 min. The shard does not connect
 *     and {@code awaitReady()} keeps waiting; a listener's {@code onException} can shut it down.
 * <li>{@code run} throwing (JDA could not open the websocket): logged, and the queue is asked again.
 * </ul>
 */
public class GatewayQueueController extends SessionControllerAdapter {
    private static final Logger LOG = LoggerFactory.getLogger(GatewayQueueController.class);
    private static final Duration CONNECT_TIMEOUT = Duration.ofSeconds(5);
    /** java.net.http cannot turn on TCP keepalive: this bounds a wait on a host that vanished. */
    private static final Duration WAIT_TIMEOUT = Duration.ofHours(6);
    private static final Duration UNAVAILABLE_FIRST = Duration.ofSeconds(1);
    private static final Duration UNAVAILABLE_CAP = Duration.ofSeconds(30);
    private static final Duration REFUSED_FIRST = Duration.ofSeconds(30);
    private static final Duration REFUSED_CAP = Duration.ofMinutes(10);
    private static final int BODY_LOGGED = 200;

    private final HttpClient http = HttpClient.newBuilder()
            .version(HttpClient.Version.HTTP_1_1)
            .connectTimeout(CONNECT_TIMEOUT)
            .build();
    private final String base;
    private final String authorization;
    private final Map<SessionConnectNode, Waiter> waiters = new ConcurrentHashMap<>();
    private final ScheduledExecutorService timer =
            Executors.newSingleThreadScheduledExecutor(daemon("gateway-queue-timer"));
    /** {@code run(false)} blocks until READY, so each granted node gets a thread of its own. */
    private final ExecutorService connectors = Executors.newCachedThreadPool(daemon("gateway-queue-connect"));

    /**
     * @param url    the queue's base, like {@code http://gateway-queue/}
     * @param secret sent as {@code Authorization: Bearer <secret>}; null or empty sends none
     */
    public GatewayQueueController(String url, String secret) {
        this.base = url.endsWith("/") ? url : url + "/";
        this.authorization = secret == null || secret.isEmpty() ? null : "Bearer " + secret;
    }

    @Override
    public void appendSession(SessionConnectNode node) {
        Waiter waiter = new Waiter(node, 0);
        Waiter previous = waiters.put(node, waiter);
        if (previous != null) {
            previous.cancel();
        }
        waiter.start();
    }

    @Override
    public void removeSession(SessionConnectNode node) {
        Waiter waiter = waiters.remove(node);
        if (waiter != null) {
            waiter.cancel();
        }
    }

    /** Completes when a node may send its first request; called on JDA's thread, must not block. */
    protected CompletableFuture<Void> beforeWaiting(int shard) {
        return CompletableFuture.completedFuture(null);
    }

    /** The queue granted {@code node}'s shard; it runs next unless JDA removed it. On a connector thread. */
    protected void granted(SessionConnectNode node) {}

    /** A granted attempt is over: {@code ready} if it reached READY. On a connector thread. */
    protected void attemptEnded(SessionConnectNode node, boolean ready) {}

    /** Runs {@code task} on a connector thread, where blocking is fine. */
    protected final void execute(Runnable task) {
        connectors.execute(task);
    }

    protected final HttpClient http() {
        return http;
    }

    /** A request to the queue with the shared secret set; {@code target} is relative to the base. */
    protected final HttpRequest.Builder request(String target) {
        HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(base + target));
        return authorization == null ? request : request.header("Authorization", authorization);
    }

    protected static String abbreviate(String body) {
        return body.length() <= BODY_LOGGED ? body : body.substring(0, BODY_LOGGED) + "...";
    }

    private static boolean isReady(JDA jda) {
        JDA.Status status = jda.getStatus();
        return status.isInit() && status.ordinal() >= JDA.Status.LOADING_SUBSYSTEMS.ordinal();
    }

    private static boolean isShuttingDown(JDA jda) {
        JDA.Status status = jda.getStatus();
        return status == JDA.Status.SHUTTING_DOWN || status == JDA.Status.SHUTDOWN;
    }

    /** Exponential backoff, half of each delay random. */
    private static Duration backoff(Duration first, Duration cap, int failures) {
        long full = Math.min(cap.toMillis(), first.toMillis() << Math.min(failures, 20));
        return Duration.ofMillis(full / 2 + ThreadLocalRandom.current().nextLong(full / 2 + 1));
    }

    private static ThreadFactory daemon(String name) {
        AtomicInteger count = new AtomicInteger();
        return task -> {
            Thread thread = new Thread(task, name + "-" + count.incrementAndGet());
            thread.setDaemon(true);
            return thread;
        };
    }

    /** One node's wait: a request in flight or a retry scheduled, until granted or cancelled. */
    private final class Waiter {
        private final SessionConnectNode node;
        private final int shard;
        private int unavailable;
        private int refusals;
        private volatile boolean cancelled;
        private volatile Future<?> pending;

        Waiter(SessionConnectNode node, int unavailable) {
            this.node = node;
            this.shard = node.getShardInfo().getShardId();
            this.unavailable = unavailable;
        }

        void start() {
            beforeWaiting(shard).whenComplete((ignored, failure) -> ask());
        }

        void cancel() {
            cancelled = true;
            Future<?> current = pending;
            if (current != null) {
                current.cancel(true);
            }
        }

        private void ask() {
            if (cancelled) {
                return;
            }
            HttpRequest request = request("?shard=" + shard).timeout(WAIT_TIMEOUT).GET().build();
            CompletableFuture<HttpResponse<String>> answer =
                    http.sendAsync(request, HttpResponse.BodyHandlers.ofString());
            pending = answer;
            if (cancelled) {
                answer.cancel(true);
            }
            answer.whenComplete(this::answered);
        }

        private void later(Duration delay) {
            if (cancelled) {
                return;
            }
            pending = timer.schedule(this::ask, delay.toMillis(), TimeUnit.MILLISECONDS);
            if (cancelled) {
                pending.cancel(false);
            }
        }

        private void answered(HttpResponse<String> response, Throwable failure) {
            if (failure != null) {
                if (!cancelled) {
                    unreachable(failure instanceof CompletionException && failure.getCause() != null
                            ? failure.getCause() : failure);
                }
            } else if (response.statusCode() == 200) {
                boolean wanted = !cancelled && waiters.remove(node, this);
                connectors.execute(() -> {
                    granted(node);
                    if (wanted) {
                        connect();
                    } else {
                        attemptEnded(node, false);
                    }
                });
            } else if (cancelled) {
                return;
            } else if (response.statusCode() == 503) {
                Duration delay = backoff(UNAVAILABLE_FIRST, UNAVAILABLE_CAP, unavailable++);
                LOG.info("gateway-queue is restarting; shard {} asks again in {} ms",
                        shard, delay.toMillis());
                later(delay);
            } else {
                refused(response);
            }
        }

        private void unreachable(Throwable failure) {
            Duration delay = backoff(UNAVAILABLE_FIRST, UNAVAILABLE_CAP, unavailable++);
            LOG.warn("gateway-queue at {} unreachable ({}); shard {} asks again in {} ms",
                    base, failure.toString(), shard, delay.toMillis());
            later(delay);
        }

        private void refused(HttpResponse<String> response) {
            GatewayQueueException error =
                    new GatewayQueueException(shard, response.statusCode(), abbreviate(response.body()));
            Duration delay = backoff(REFUSED_FIRST, REFUSED_CAP, refusals++);
            LOG.error("{}; check its URL and QUEUE_AUTH_TOKEN. Asking again in {} s",
                    error.getMessage(), delay.toSeconds());
            JDA jda = node.getJDA();
            connectors.execute(() -> jda.getEventManager().handle(new ExceptionEvent(jda, error, true)));
            later(delay);
        }

        private void connect() {
            try {
                node.run(false);
                attemptEnded(node, isReady(node.getJDA()));
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                attemptEnded(node, false);
            } catch (RuntimeException e) {
                attemptEnded(node, false);
                if (isShuttingDown(node.getJDA())) {
                    return;
                }
                Duration delay = backoff(UNAVAILABLE_FIRST, UNAVAILABLE_CAP, unavailable);
                LOG.error("Shard {} could not connect; asking gateway-queue again in {} ms",
                        shard, delay.toMillis(), e);
                Waiter retry = new Waiter(node, unavailable + 1);
                if (waiters.putIfAbsent(node, retry) == null) {
                    retry.later(delay);
                }
            }
        }
    }

    /** gateway-queue answered neither 200 nor 503: its URL or the shared secret is wrong. */
    public static final class GatewayQueueException extends RuntimeException {
        private static final long serialVersionUID = 1L;
        private final int shard;
        private final int status;
        private final String body;

        public GatewayQueueException(int shard, int status, String body) {
            super("gateway-queue refused shard " + shard + ": HTTP " + status + " " + body);
            this.shard = shard;
            this.status = status;
            this.body = body;
        }

        public int getShard() {
            return shard;
        }

        public int getStatus() {
            return status;
        }

        public String getBody() {
            return body;
        }
    }
}
