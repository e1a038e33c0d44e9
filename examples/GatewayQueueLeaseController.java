import java.io.IOException;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.Collections;
import java.util.Map;
import java.util.Set;
import java.util.WeakHashMap;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.locks.ReentrantLock;

import com.neovisionaries.ws.client.WebSocketFrame;
import net.dv8tion.jda.api.JDA;
import net.dv8tion.jda.api.events.GenericEvent;
import net.dv8tion.jda.api.events.session.SessionDisconnectEvent;
import net.dv8tion.jda.api.hooks.EventListener;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * {@link GatewayQueueController} for a server in lease mode: a grant holds the shard's bucket until
 * {@code POST /release?shard=N&outcome=...} or until {@code LEASE_TIMEOUT} passes. Checked against
 * JDA 5.6.1. Use it only against a server with lease mode on.
 *
 * <p>JDA's {@code SessionConnectNode.run(false)} returns when READY arrives (status
 * {@code LOADING_SUBSYSTEMS}) or the attempt fails ({@code RECONNECT_QUEUED}, or shutdown), so the
 * release needs no listener: {@code ready} then, or {@code closed}. {@code ReadyEvent} and
 * {@code SessionRecreateEvent} come later, once every guild has loaded. A listener that this class
 * adds to each shard's JDA tells an op 9 apart ({@code invalid_session}): it reads the
 * {@code SessionDisconnectEvent} JDA fires before it queues the reconnect (with an async event pool
 * or an {@code AnnotatedEventManager} such an attempt is reported as {@code closed}). A grant that
 * came after JDA removed the node is released as {@code closed}, and each release is sent before
 * the shard's next request.
 *
 * <p>A release that fails is logged at WARN and dropped; {@code LEASE_TIMEOUT} then ends the hold,
 * as it does when the process dies between the grant and READY, and caps a reconnect node that
 * keeps retrying the websocket by itself (JDA's {@code reconnect} loop) before it reaches READY.
 */
public class GatewayQueueLeaseController extends GatewayQueueController {
    private static final Logger LOG = LoggerFactory.getLogger(GatewayQueueLeaseController.class);
    private static final Duration RELEASE_TIMEOUT = Duration.ofSeconds(10);
    /** The close reason JDA's WebSocketClient sends after an op 9 (its INVALIDATE_REASON). */
    private static final String INVALIDATE_REASON = "INVALIDATE_SESSION";

    private final Map<Integer, Lease> leases = new ConcurrentHashMap<>();
    private final Set<JDA> watched =
            Collections.synchronizedSet(Collections.newSetFromMap(new WeakHashMap<>()));
    private final EventListener invalidations = this::onEvent;

    public GatewayQueueLeaseController(String url, String secret) {
        super(url, secret);
    }

    @Override
    public void appendSession(SessionConnectNode node) {
        JDA jda = node.getJDA();
        if (watched.add(jda)) {
            jda.addEventListener(invalidations);
        }
        super.appendSession(node);
    }

    /** A lease still held means the last attempt ended unseen: release it before asking again. */
    @Override
    protected CompletableFuture<Void> beforeWaiting(int shard) {
        Lease lease = lease(shard);
        if (lease.lock.tryLock()) {
            try {
                if (lease.holder == null) {
                    return CompletableFuture.completedFuture(null);
                }
            } finally {
                lease.lock.unlock();
            }
        }
        return CompletableFuture.runAsync(() -> release(shard, null, "closed"), this::execute);
    }

    @Override
    protected void granted(SessionConnectNode node) {
        Lease lease = lease(node.getShardInfo().getShardId());
        lease.lock.lock();
        try {
            lease.holder = node;
            lease.invalidated = false;
        } finally {
            lease.lock.unlock();
        }
    }

    @Override
    protected void attemptEnded(SessionConnectNode node, boolean ready) {
        int shard = node.getShardInfo().getShardId();
        Lease lease = lease(shard);
        release(shard, node, ready ? "ready" : lease.invalidated ? "invalid_session" : "closed");
    }

    private void onEvent(GenericEvent event) {
        if (event instanceof SessionDisconnectEvent) {
            WebSocketFrame frame = ((SessionDisconnectEvent) event).getClientCloseFrame();
            if (frame != null && INVALIDATE_REASON.equals(frame.getCloseReason())) {
                lease(event.getJDA().getShardInfo().getShardId()).invalidated = true;
            }
        }
    }

    private Lease lease(int shard) {
        return leases.computeIfAbsent(shard, key -> new Lease());
    }

    /**
     * Sends the release if {@code shard} holds a lease, granted to {@code holder} unless that is null.
     * The shard's next request waits for the lock.
     */
    private void release(int shard, SessionConnectNode holder, String outcome) {
        Lease lease = lease(shard);
        lease.lock.lock();
        try {
            if (lease.holder == null || holder != null && lease.holder != holder) {
                return;
            }
            lease.holder = null;
            HttpRequest request = request("release?shard=" + shard + "&outcome=" + outcome)
                    .timeout(RELEASE_TIMEOUT)
                    .POST(HttpRequest.BodyPublishers.noBody())
                    .build();
            try {
                HttpResponse<String> response = http().send(request, HttpResponse.BodyHandlers.ofString());
                if (response.statusCode() / 100 == 2) {
                    LOG.debug("Released shard {} ({})", shard, outcome);
                } else {
                    LOG.warn("gateway-queue refused to release shard {} ({}): HTTP {} {}; "
                            + "LEASE_TIMEOUT ends the hold",
                            shard, outcome, response.statusCode(), abbreviate(response.body()));
                }
            } catch (IOException e) {
                LOG.warn("Could not release shard {} ({}): {}; LEASE_TIMEOUT ends the hold",
                        shard, outcome, e.toString());
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        } finally {
            lease.lock.unlock();
        }
    }

    private static final class Lease {
        final ReentrantLock lock = new ReentrantLock();
        SessionConnectNode holder;
        volatile boolean invalidated;
    }
}
