-- Shared by every kind's health check: the generator puts it where a kind's
-- source says `--#include lib.lua`, after the kind has set KIND.
local hs = {}

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

-- Progressing until the operator has observed this generation: the
-- status-wide observedGeneration, else the condition `fallback`'s own.
-- Returns true when it filled in hs.
local function unobserved(status, generation, fallback)
  local observed = status and status.observedGeneration
  if observed == nil and fallback ~= nil then
    observed = fallback.observedGeneration
  end
  if observed == nil then
    hs.status = "Progressing"
    hs.message = "Waiting for the operator to reconcile the " .. KIND
    return true
  end
  if generation ~= nil and observed ~= generation then
    hs.status = "Progressing"
    hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
      .. " (observed " .. tostring(observed) .. ")"
    return true
  end
  return false
end
