-- Argo CD health of a RecipientList (mailrelay.io/v1alpha1).
-- Healthy:     Accepted=True (and Ready=True if the operator sets Ready) and
--              status.observedGeneration == metadata.generation
-- Progressing: not yet observed, an older generation observed, or a condition
--              Unknown or False while the operator is still working
-- Degraded:    Accepted=False (e.g. Conflict, NotAllowed, RelayNotFound) or
--              Ready=False with a failure reason
-- Written for Lua 5.1 (Argo CD's gopher-lua); tests run it with lua5.4.
local hs = {}

-- A condition False with one of these reasons is work in progress, not a failure.
local in_progress = {
  Reconciling = true, Progressing = true, Pending = true, Creating = true,
}

local function find_condition(status, ctype)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function describe(c)
  local text = c.reason or "NoReason"
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation
local accepted = find_condition(status, "Accepted")
local ready = find_condition(status, "Ready")
-- The status-wide observedGeneration, else the condition's own.
local observed = status and status.observedGeneration
if observed == nil and accepted ~= nil then
  observed = accepted.observedGeneration
end
if observed == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the RecipientList"
  return hs
end
if generation ~= nil and observed ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
    .. " (observed " .. tostring(observed) .. ")"
  return hs
end

-- Accepted first: a refusal is the most useful thing to show.
local checks = {}
if accepted ~= nil then
  table.insert(checks, accepted)
end
if ready ~= nil then
  table.insert(checks, ready)
end
for _, c in ipairs(checks) do
  if c.status == "False" then
    if in_progress[c.reason or ""] then
      hs.status = "Progressing"
    else
      hs.status = "Degraded"
    end
    hs.message = c.type .. "=False, " .. describe(c)
    return hs
  end
end
if accepted == nil or accepted.status ~= "True" then
  hs.status = "Progressing"
  hs.message = accepted and describe(accepted) or "No Accepted condition yet"
  return hs
end
if ready ~= nil and ready.status ~= "True" then
  hs.status = "Progressing"
  hs.message = describe(ready)
  return hs
end

hs.status = "Healthy"
hs.message = describe(accepted)
return hs
